"""Age and gender estimation: any timm backbone (the zoo's Mamba ones included) with two heads trained jointly."""
from __future__ import annotations

import math
from typing import Any

import torch

from losses.multitask import AgeGenderLoss
from model_config import AgeGenderConfig
from models.agegender.metrics import AgeGenderMetrics
from models.agegender.model import mlp_head
from models.backbones import create_backbone
from zoo.module import ZooModule


class AgeGender(ZooModule):
    """timm backbone -> pooled features -> age head (sigmoid x max_age, years) and gender head (logit, > 0 = female).

    forward(images) with images (B, 3, H, W) normalised by the backbone's mean / std (see
    `datamodules.utkface.build_transform`) -> (age (B,) in years within [0, max_age], gender logit (B,)).
    Batches are dicts {"image", "age" (years), "gender" (0 male / 1 female)}. Logs loss terms, age MAE in years
    overall and per decade of the true age (val/age_mae_decade_3 = ages 30-39), gender accuracy and F1.
    """

    TASK = "agegender"
    CONFIG = AgeGenderConfig

    def __init__(self, config: AgeGenderConfig | dict[str, Any] | None = None, task: str | None = None,
                 **overrides: Any):
        super().__init__(config, task, **overrides)
        cfg = self.cfg
        # Pretrained weights are loaded in `setup("fit")`, not here: a checkpoint must open without the weight cache.
        self.net = create_backbone(cfg.backbone, pretrained=False)
        features = self.net.num_features
        self.age_head = mlp_head(features, cfg.head_hidden, cfg.head_dropout)
        self.gender_head = mlp_head(features, cfg.head_hidden, cfg.head_dropout)
        with torch.no_grad():  # start at a typical age (~30) rather than max_age / 2
            self.age_head[-1].bias.fill_(math.log(30.0 / (cfg.max_age - 30.0)))
        self.criterion = AgeGenderLoss(cfg.age_loss, cfg.age_weight, cfg.gender_weight, cfg.max_age, cfg.age_beta)
        self.train_metrics = AgeGenderMetrics(cfg.max_age)
        self.val_metrics = AgeGenderMetrics(cfg.max_age)
        self.test_metrics = AgeGenderMetrics(cfg.max_age)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net(images)
        # float32 outputs under bf16 autocast: bf16 would round ages to ~0.25 years
        age = torch.sigmoid(self.age_head(features).squeeze(-1).float()) * self.cfg.max_age
        return age, self.gender_head(features).squeeze(-1).float()

    @torch.no_grad()
    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"age": (B,) years, "p_female": (B,) probability} for a normalised batch."""
        age, logit = self(images.to(self.device))
        return {"age": age, "p_female": torch.sigmoid(logit)}

    # ----- training -----
    def setup(self, stage: str) -> None:
        resuming = self._trainer is not None and self._trainer.ckpt_path
        if stage == "fit" and self.cfg.pretrained and not resuming:
            self.net.load_state_dict(create_backbone(self.cfg.backbone, pretrained=True).state_dict())
        if stage == "fit" and getattr(self.cfg, "init_from", None) and not resuming:
            from models.backbones import init_from_checkpoint

            print(f"[agegender] {init_from_checkpoint(self.net, self.cfg.init_from)}")

    def _step(self, batch: dict[str, torch.Tensor], split: str, metrics: AgeGenderMetrics) -> torch.Tensor:
        age, logit = self(batch["image"])
        losses = self.criterion(age, logit, batch["age"], batch["gender"])
        metrics.update(age.detach().float(), logit.detach().float(), batch["age"], batch["gender"])
        n = batch["image"].shape[0]
        self.log(f"{split}/loss", losses["loss"], prog_bar=True, batch_size=n, on_step=split == "train",
                 on_epoch=True, sync_dist=split != "train")
        self.log_dict({f"{split}/age_loss": losses["age"], f"{split}/gender_loss": losses["gender"]}, batch_size=n,
                      on_step=False, on_epoch=True, sync_dist=split != "train")
        return losses["loss"]

    def _log_metrics(self, split: str, metrics: AgeGenderMetrics) -> None:
        values = {f"{split}/{k}": v for k, v in metrics.compute().items()}
        headline = {k: values.pop(k) for k in (f"{split}/age_mae", f"{split}/gender_acc")}
        # torchmetrics' compute() has gathered every rank already; sync_dist averages equal values (Lightning's ask)
        self.log_dict(headline, prog_bar=split == "val", sync_dist=True)
        self.log_dict(values, sync_dist=True)
        metrics.reset()

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_metrics)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_metrics)

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch, batch_idx):
        images = batch["image"] if isinstance(batch, dict) else batch
        return self.predict_batch(images)

    # ----- inference -----
    def predict_commands(self) -> list:
        from models.agegender.verbs import COMMANDS

        return list(COMMANDS)
