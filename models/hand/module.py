"""`HandBiometrics`: the LightningModule of the hand task (identity, gender and age-group heads, an embedding for
open-set identification, the silhouette auxiliary loss, the protocol metrics and the calibrated threshold)."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.metric import MetricLoss
from model_config import HandConfig
from models.hand.metrics import protocol_tables
from models.hand.model import HandNet, load_vmamba_v0, timm_encoder
from zoo.config_checks import config_error
from zoo.embedding import Embedder
from zoo.module import ZooModule
from zoo.verification import calibrate_threshold


class HandBiometrics(Embedder, ZooModule):
    """Hand-biometrics LightningModule (task "hand"): `model(images (B, 3, S, S))` -> dict of identity / gender /
    age logits, a unit embedding (B, E) and, with the decoder, silhouette logits (B, 1, S, S).

    Loss: label-smoothed CE per head (weights identity/gender/age_weight; identity only for training classes), the
    metric loss on the embedding (`metric_loss`, e.g. ArcFace over the training identities; `metric_weight`), and
    BCE on the silhouette (`silhouette_weight`). Validation logs val/loss, per head acc / weighted precision, recall,
    F1 (overall and val/<aspect>/...), identity top-5, and rank-1 / rank-5 / mAP with one gallery image per subject;
    the same/different cosine threshold calibrated on validation pairs (best balanced accuracy) is the `threshold`
    buffer, saved in checkpoints, which `identify --gallery` uses to answer "unknown".
    """

    TASK = "hand"
    CONFIG = HandConfig
    EMBEDDING_KEY = "embedding"  # `embed` (zoo.embedding.Embedder) returns this output

    def __init__(self, config=None, task=None, **overrides):
        super().__init__(config, task, **overrides)
        cfg = self.cfg
        try:
            self.net = HandNet(cfg)
        except ValueError as e:  # a timm backbone without the U-Net's scales (`timm_feature_levels`)
            raise config_error(cfg, "backbone", f"must be own or a timm model with feature levels at reductions 4, "
                                                f"8, 16 and 32 (the U-Net's scales): {e}") from None
        self.criterion = (MetricLoss(cfg.metric_loss, cfg.embedding_dim, cfg.num_identities, cfg.margin, cfg.scale,
                                       "all") if cfg.metric_weight > 0 and cfg.head != "published" else None)
        self.register_buffer("threshold", torch.tensor(0.5))
        if cfg.freeze_encoder_epochs < 0:
            self.net.encoder.requires_grad_(False)
        self._outputs: dict[str, list[Tensor]] = defaultdict(list)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.net(images)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze_encoder_epochs < 0:
            self.net.encoder.eval()  # a frozen encoder runs as at inference (no drop path)
        return self

    # ----- losses -----
    def losses(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.cfg
        ce = lambda logits, t: F.cross_entropy(logits.float(), t, label_smoothing=cfg.label_smoothing,  # noqa: E731
                                               ignore_index=-1)
        parts: dict[str, Tensor] = {}
        known = batch["identity"] >= 0
        if known.any() and cfg.identity_weight > 0:
            parts["identity"] = cfg.identity_weight * ce(out["identity"], batch["identity"])
        parts["gender"] = cfg.gender_weight * ce(out["gender"], batch["gender"])
        parts["age"] = cfg.age_weight * ce(out["age"], batch["age"])
        if self.criterion is not None and known.sum() > 1:
            parts["metric"] = cfg.metric_weight * self.criterion(out["embedding"][known], batch["identity"][known])
        if "silhouette" in out and cfg.silhouette_weight > 0:
            parts["silhouette"] = cfg.silhouette_weight * F.binary_cross_entropy_with_logits(
                out["silhouette"].float(), batch["mask"].float())
        return parts

    def on_train_epoch_start(self) -> None:
        n = self.cfg.freeze_encoder_epochs
        if n > 0:
            self.net.encoder.requires_grad_(self.current_epoch >= n)  # frozen params get no grad: the optimiser skips them

    def training_step(self, batch, batch_idx):
        parts = self.losses(self(batch["image"]), batch)
        loss = sum(parts.values())
        bs = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/epoch_loss", loss, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        for k, v in parts.items():
            self.log(f"train/{k}_loss", v, batch_size=bs)
        return loss

    # ----- evaluation -----
    def validation_step(self, batch, batch_idx):
        out = self(batch["image"])
        parts = self.losses(out, batch)
        self._outputs["loss"].append(sum(parts.values()).detach().float().cpu()[None])
        for k in ("identity", "gender", "age", "embedding"):
            self._outputs[k].append(out[k].detach().float().cpu())
        for k in ("identity", "gender", "age"):
            self._outputs[f"{k}_t"].append(batch[k].cpu())
        for k in ("person", "aspect"):
            self._outputs[k].append(batch[k].cpu())

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val", calibrate=not self.trainer.sanity_checking)

    def on_test_epoch_end(self) -> None:
        self._evaluate("test", calibrate=False)

    def _evaluate(self, prefix: str, calibrate: bool) -> None:
        # Under DDP each rank scores its own shard: sync_dist=True logs the mean over ranks.
        collected, self._outputs = self._outputs, defaultdict(list)
        if not collected:
            return
        outputs = {k: torch.cat(v) for k, v in collected.items()}
        self.log(f"{prefix}/loss", outputs.pop("loss").mean(), prog_bar=prefix == "val", sync_dist=True)
        tables = protocol_tables(outputs, self.cfg.gallery_draws, self.cfg.split_seed)
        for name, row in tables.items():
            where = prefix if name == "overall" else f"{prefix}/{name.replace(' ', '_')}"
            for k, v in row.items():
                if name == "overall" or k.endswith(("_acc", "_f1")) or k in ("rank1", "mAP"):
                    self.log(f"{where}/{k}", v, prog_bar=name == "overall" and k in ("identity_acc", "rank1"),
                             sync_dist=True)
        thr, acc = calibrate_threshold(outputs["embedding"], outputs["person"])
        if thr == thr:  # not NaN
            if calibrate:
                self.threshold.fill_(thr)
            self.log(f"{prefix}/threshold", thr, sync_dist=True)
            self.log(f"{prefix}/pair_balanced_acc", acc, sync_dist=True)

    # ----- set-up, optimisation, checkpoints -----
    def setup(self, stage: str) -> None:
        """A new run's encoder weights (never a resume's, never a checkpoint's own): the file `pretrained_ckpt` names,
        which takes precedence, else with `pretrained` the released ones (on in `published`: VMamba v0 Small)."""
        path = self.cfg.pretrained_ckpt
        fresh = stage == "fit" and self.starts_fresh
        if fresh and self.cfg.pretrained and not path:  # weights loaded here, not on every load
            if self.cfg.backbone == "own":  # VMamba v0's release of this size (zoo.pretrained: cached)
                name, state = self._encoder_release()
                report = load_vmamba_v0(self.net.encoder, state)
                print(f"[hand] loaded the released {name} weights into the encoder ({len(report['missing'])} "
                      f"encoder key(s) not loaded {report['missing'][:3]})")
            else:
                self.net.encoder.load_state_dict(timm_encoder(self.cfg.backbone, pretrained=True).state_dict())
                print(f"[hand] loaded the published weights of {self.cfg.backbone} into the encoder")
        if fresh and path:
            report = load_vmamba_v0(self.net.encoder, path, ema=self.cfg.pretrained_ema)
            print(f"[hand] loaded VMamba v0 weights from {path}: {len(report['missing'])} encoder key(s) not loaded "
                  f"{report['missing'][:5]}, {len(report['unexpected'])} checkpoint key(s) unused "
                  f"{report['unexpected'][:5]}, {len(report['mismatched'])} with another shape {report['mismatched'][:5]}")

    def _encoder_release(self) -> tuple[str, dict]:
        """(timm name, weights) of the VMamba v0 release of this encoder size (zoo.pretrained: cached)."""
        from models.vmamba.convert import vmamba_v0_release_state
        from models.vmamba.model import _vmamba_cfg
        from zoo.pretrained import pretrained_state

        name = f"vmamba_{self.cfg.encoder}_v0"
        return name, pretrained_state(name, _vmamba_cfg(self.cfg.encoder), vmamba_v0_release_state)

    def fetch_released(self) -> None:
        if self.cfg.pretrained and not self.cfg.pretrained_ckpt and self.cfg.backbone == "own":
            self._encoder_release()

    def configure_callbacks(self):
        if self.cfg.early_stopping_patience > 0:
            from lightning.pytorch.callbacks import EarlyStopping

            return [EarlyStopping(self.cfg.monitor, patience=self.cfg.early_stopping_patience,
                                  mode=self.cfg.monitor_mode)]
        return []

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        checkpoint.get("state_dict", {}).setdefault("threshold", self.threshold.clone())

    def predict_commands(self) -> list:
        from models.hand.verbs import COMMANDS

        return list(COMMANDS)
