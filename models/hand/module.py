"""`HandBiometrics`: the LightningModule of the hand task (identity, gender and age-group heads, an embedding for
open-set identification, the silhouette auxiliary loss, the protocol metrics and the calibrated threshold)."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.hands11k import ASPECTS
from losses.metric import MetricLoss
from model_config import HandConfig
from models.face.metrics import calibrate_threshold
from models.hand.metrics import classification_metrics, open_set_metrics
from models.hand.model import HandNet, load_vmamba_v0, timm_encoder
from zoo.module import ZooModule

HEADS = ("identity", "gender", "age")


def protocol_tables(outputs: dict[str, Tensor], draws: int = 10, seed: int = 0) -> dict[str, dict[str, float]]:
    """Metrics overall and per aspect from concatenated outputs (identity/gender/age logits, embedding, and the
    targets identity_t, gender_t, age_t, person, aspect): {"overall" | aspect: {"identity_acc", "identity_f1", ...,
    "identity_top5", "rank1", "rank5", "mAP"}}. Retrieval is per aspect (gallery and queries of one aspect;
    overall pools the aspects when no subject has two images of one aspect, as in small validation splits)."""
    tables: dict[str, dict[str, float]] = {}
    aspect = outputs["aspect"]
    for name, keep in [("overall", torch.ones_like(aspect, dtype=torch.bool))] + [
            (a, aspect == i) for i, a in enumerate(ASPECTS)]:
        if not keep.any():
            continue
        row: dict[str, float] = {}
        for head in HEADS:
            for k, v in classification_metrics(outputs[head][keep], outputs[f"{head}_t"][keep], head == "identity").items():
                row[f"{head}_{k}"] = v
        retrieval = open_set_metrics(outputs["embedding"][keep], outputs["person"][keep], aspect[keep], draws, seed)
        if name == "overall" and retrieval["rank1"] != retrieval["rank1"]:
            # No subject has two images of one aspect (a small split): pool the aspects instead of reporting NaN.
            retrieval = open_set_metrics(outputs["embedding"], outputs["person"], None, draws, seed)
        row.update(retrieval)
        tables[name] = row
    return tables


class HandBiometrics(ZooModule):
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

    def __init__(self, config=None, task=None, **overrides):
        super().__init__(config, task, **overrides)
        cfg = self.cfg
        self.net = HandNet(cfg)
        self.metric_loss = (MetricLoss(cfg.metric_loss, cfg.embedding_dim, cfg.num_identities, cfg.margin, cfg.scale,
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

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 32) -> Tensor:
        """Unit embeddings (N, E) float32 on the CPU of a normalised (N, 3, S, S) batch, in eval mode."""
        self.eval()
        return torch.cat([self(images[i:i + batch_size].to(self.device))["embedding"].float().cpu()
                          for i in range(0, len(images), batch_size)])

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
        if self.metric_loss is not None and known.sum() > 1:
            parts["metric"] = cfg.metric_weight * self.metric_loss(out["embedding"][known], batch["identity"][known])
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
        self.log("train/epoch_loss", loss, on_step=False, on_epoch=True, batch_size=bs)
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
        collected, self._outputs = self._outputs, defaultdict(list)
        if not collected:
            return
        outputs = {k: torch.cat(v) for k, v in collected.items()}
        self.log(f"{prefix}/loss", outputs.pop("loss").mean(), prog_bar=prefix == "val")
        tables = protocol_tables(outputs, self.cfg.gallery_draws, self.cfg.split_seed)
        for name, row in tables.items():
            where = prefix if name == "overall" else f"{prefix}/{name.replace(' ', '_')}"
            for k, v in row.items():
                if name == "overall" or k.endswith(("_acc", "_f1")) or k in ("rank1", "mAP"):
                    self.log(f"{where}/{k}", v, prog_bar=name == "overall" and k in ("identity_acc", "rank1"))
        thr, acc = calibrate_threshold(outputs["embedding"], outputs["person"])
        if thr == thr:  # not NaN
            if calibrate:
                self.threshold.fill_(thr)
            self.log(f"{prefix}/threshold", thr)
            self.log(f"{prefix}/pair_balanced_acc", acc)

    # ----- set-up, optimisation, checkpoints -----
    def setup(self, stage: str) -> None:
        path = self.cfg.pretrained_ckpt
        fresh = stage == "fit" and not getattr(self._trainer, "ckpt_path", None)  # not a resume
        if fresh and self.cfg.pretrained:  # weights loaded here, not on every load
            if self.cfg.backbone == "vmamba":  # VMamba v0's release of this size (zoo.pretrained: cached)
                from models.hand.model import _vmamba_cfg, vmamba_v0_release_state
                from zoo.pretrained import pretrained_state

                name = f"vmamba_{self.cfg.encoder}_v0"
                state = pretrained_state(name, _vmamba_cfg(self.cfg.encoder), vmamba_v0_release_state)
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

    def configure_optimizers(self):
        if not self.cfg.decay_milestones:
            return super().configure_optimizers()
        from timm.scheduler import MultiStepLRScheduler

        from zoo.optim import build_optimizer

        cfg = self.cfg
        optimizer = build_optimizer(self, cfg)
        per_epoch = cfg.sched_interval == "epoch"
        steps = 1 if per_epoch else self._updates_per_epoch()
        # timm applies milestone m at t == m - 1 (its historical convention): +1 makes the lr change at epoch m.
        scheduler = MultiStepLRScheduler(optimizer, decay_t=[int(m * steps) + 1 for m in cfg.decay_milestones],
                                         decay_rate=cfg.decay_rate, warmup_t=int(cfg.warmup_epochs * steps),
                                         warmup_lr_init=cfg.warmup_lr, warmup_prefix=False, t_in_epochs=per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": cfg.sched_interval}}

    def configure_callbacks(self):
        if self.cfg.early_stopping_patience > 0:
            from lightning.pytorch.callbacks import EarlyStopping

            return [EarlyStopping(self.cfg.monitor, patience=self.cfg.early_stopping_patience,
                                  mode=self.cfg.monitor_mode)]
        return []

    def on_load_checkpoint(self, checkpoint) -> None:
        checkpoint.get("state_dict", {}).setdefault("threshold", self.threshold.clone())

    def predict_commands(self) -> list:
        from models.hand.verbs import hand_commands

        return hand_commands()
