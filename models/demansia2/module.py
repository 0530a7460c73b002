"""`DeMansia2`: the LightningModule of the DeMansia 2 task (token labeling, MixToken, raw + EMA validation, verbs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from callbacks.ema import EMA
from losses.distillation import HardDistillationLoss
from losses.token_labeling import TokenLabelingLoss, one_hot_smoothed, soft_cross_entropy, token_label_targets
from model_config import DeMansia2Config
from models.demansia2.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeMansia2Net,
    mix_box,
    net_kwargs,
    swap_box,
)
from zoo.errors import ZooError
from zoo.module import ZooModule


def build_network(cfg: DeMansia2Config) -> nn.Module:
    """DeMansia2Net for `backbone=own`; any other timm name gives that timm model with a `num_classes` head
    (e.g. `--set backbone=resnet18`, for a baseline through the same data, schedule and metrics)."""
    if cfg.backbone in ("own", "", None):
        return DeMansia2Net(**net_kwargs(cfg))
    from models.backbones import check_backbone_name

    check_backbone_name(cfg.backbone)
    if cfg.token_label_dir or getattr(cfg, "teacher", None):
        raise ZooError(f"--set token_label_dir / teacher need the DeMansia 2 network (token logits); "
                       f"backbone={cfg.backbone} has none. Drop one of the two settings.")
    import timm

    extra = {"drop_path_rate": cfg.drop_path} if cfg.drop_path else {}
    return timm.create_model(cfg.backbone, num_classes=cfg.num_classes, **extra)


def released_tiny_state() -> dict[str, Tensor]:
    """The released DeMansia 2 Tiny EMA weights in our names (`zoo.pretrained`: cached, else downloaded, converted)."""
    from models.demansia2.model import default_cfgs, released_state
    from zoo.pretrained import pretrained_state

    return pretrained_state("demansia2_tiny", default_cfgs["demansia2_tiny"].default.to_dict(), released_state)


def load_released(net: nn.Module, cfg: DeMansia2Config) -> str:
    """Load the released DeMansia 2 Tiny EMA weights (`zoo.pretrained`: cached, else downloaded and converted) into
    `net`; the class heads only when there are 1000 classes. Returns a one-line report."""
    from models.demansia2.model import RELEASE_PRESET

    state = released_tiny_state()
    heads = cfg.num_classes == 1000
    if not heads:
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "aux_head."))}
    own = net.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if wrong or cfg.scan_mode != "legacy":
        raise ZooError(f"pretrained=true loads the released DeMansia 2 Tiny, whose network is --preset "
                       f"{RELEASE_PRESET} (legacy mixer); this config's network differs ({len(wrong)} tensors do not "
                       f"fit, e.g. {wrong[:2]}; scan_mode={cfg.scan_mode}). Use --preset {RELEASE_PRESET}.")
    distill = getattr(net, "has_dist_token", False)  # the released network has no distillation token: left new
    net.load_state_dict(state, strict=heads and not distill)
    return (f"loaded the released DeMansia 2 Tiny EMA weights ({len(state)} tensors"
            f"{'' if heads else ', class heads left new'}{', distillation token left new' if distill else ''})")


class DeMansia2(ZooModule):
    """DeMansia 2 training and inference.

    Batches are dicts from `datamodules.imagenet`: "image" (B, 3, S, S), "label" (B,), and with token labels
    "label_map" (B, 2, 5, h, w), "box" (B, 4), "flip" (B,).

    Training loss (weights `cls_label_weight`, `token_label_weight`):
    - with token labels: soft CE of the class logits against the pooled teacher map (mixed by MixToken's lambda) +
      dense soft CE of the token logits against the teacher map on the token grid (unmixed: the token logits inside the
      MixToken box are swapped back);
    - without: label-smoothed CE of the class logits (MixToken-mixed one-hot targets) + label-smoothed CE of the max
      over tokens of the token logits (the term the eval logits add) against the image's label.
    - with `distill=hard` (DeiT): the class term becomes (1 - distill_weight) * that class CE + distill_weight * CE of
      the distillation token's head against the argmax of the frozen `teacher` on the same augmented image (with
      MixToken, the image with the box's pixels from the reversed batch). The teacher is loaded at fit time from the
      config (a resumed run reloads it) and is never part of the module's state_dict or checkpoints.
    Validation: top-1/top-5 and CE of head(cls) + aux_weight * max_t aux_head(tokens); with EMA the EMA weights give
    val/top1, val/top5, val/loss and the raw weights val/top1_raw, val/top5_raw, val/loss_raw.
    """

    TASK = "demansia2"
    CONFIG = DeMansia2Config

    def __init__(self, config: DeMansia2Config | dict[str, Any] | None = None, task: str | None = None,
                 **overrides: Any):
        super().__init__(config, task, **overrides)
        cfg = self.cfg
        self.net = build_network(cfg)
        self.criterion = TokenLabelingLoss(cfg.cls_label_weight, cfg.token_label_weight)
        self.distill_loss = HardDistillationLoss(cfg.distill_weight) if cfg.distill == "hard" else None
        self._teacher = None  # models.demansia2.token_labels.Teacher: a plain attribute, never a submodule
        k = max(cfg.num_classes, 1)
        self.metrics = nn.ModuleDict({
            name: torchmetrics.classification.MulticlassAccuracy(num_classes=k, top_k=min(top, k), average="micro")
            for name, top in (("top1", 1), ("top5", 5), ("top1_raw", 1), ("top5_raw", 5))
        })

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W), normalised with ImageNet mean/std -> logits (B, num_classes)."""
        return self.net(x)

    def fetch_released(self) -> None:
        if self.cfg.pretrained:
            released_tiny_state()

    def setup(self, stage: str) -> None:
        """`pretrained`: the released Tiny EMA weights start a new run (never a resume, never a checkpoint's own
        weights). `teacher`: the token labels missing from the datamodule's label folder are made first (on rank 0,
        resumable; the cost is printed), before the training loader reads them."""
        if stage == "fit" and self.cfg.pretrained and self.starts_fresh:
            print(f"[demansia2] {load_released(self.net, self.cfg)}")
        if stage == "fit" and self.distill_loss is not None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            index = getattr(dm, "train_index", None)
            self.load_teacher(list(index.classes) if index is not None else None)
        self._make_token_labels(stage)

    def load_teacher(self, classes: list[str] | None = None):
        """The distillation teacher from `cfg.teacher` (a zoo checkpoint read weights-only, or a timm name with its
        pretrained weights), frozen, in eval mode, its classes checked against the data's (`classes`: the class
        folders; None: `cfg.num_classes`). Loaded under a forked RNG, so it draws nothing from the run's generators."""
        from models.demansia2.token_labels import check_classes, load_teacher

        spec = self.cfg.teacher
        with torch.random.fork_rng(devices=[]):
            teacher = load_teacher(spec, pretrained=not Path(spec).expanduser().is_file())
        teacher.name = f"(--set teacher={spec})"
        classes = classes or [str(k) for k in range(self.cfg.num_classes)]
        check_classes(teacher, classes, use=f"distill={self.cfg.distill} (num_classes={self.cfg.num_classes}) needs",
                      top_k=False)
        teacher.net.eval().requires_grad_(False)
        self._teacher = teacher
        return teacher

    def teacher_logits(self, x: Tensor) -> Tensor:
        """The frozen teacher's logits (B, K) of the student's (augmented, normalised) images (B, 3, H, W)."""
        teacher = self._teacher or self.load_teacher()
        if next(teacher.net.parameters()).device != x.device:
            teacher.net.to(x.device)
        return teacher.logits(x, IMAGENET_MEAN, IMAGENET_STD)

    # ----- training -----
    @property
    def is_demansia(self) -> bool:
        """False when `cfg.backbone` swapped the network for a timm model (trained with plain label-smoothed CE)."""
        return isinstance(self.net, DeMansia2Net)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        cfg, x, labels = self.cfg, batch["image"], batch["label"]
        if not self.is_demansia:
            loss = F.cross_entropy(self.net(x).float(), labels, label_smoothing=cfg.label_smoothing)
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x))
            return loss
        grid = self.net.token_grid(x)
        box, lam = mix_box(grid) if cfg.mix_token else (None, 1.0)
        cls_logits, token_logits, dist_logits = self.net.forward_train_distill(x, box)
        if "label_map" in batch:
            cls_target, token_target = token_label_targets(batch["label_map"], batch["box"], batch["flip"],
                                                           cfg.num_classes, grid, cfg.label_smoothing,
                                                           cfg.token_label_smoothing)
            max_target = None
            if getattr(cfg, "token_label_cls", "teacher") == "label":
                cls_target = one_hot_smoothed(labels, cfg.num_classes, cfg.label_smoothing)
        else:
            cls_target = one_hot_smoothed(labels, cfg.num_classes, cfg.label_smoothing)
            token_target, max_target = None, cls_target
        if box is not None:
            cls_target = lam * cls_target + (1.0 - lam) * cls_target.flip(0)
        extra = {}
        if self.distill_loss is not None:
            # The teacher sees what the student sees: with MixToken, the box's pixels from the reversed batch.
            stride = self.net.patch_embed.stride
            seen = x if box is None else swap_box(x, tuple(v * stride for v in box))
            teacher = self.teacher_logits(seen)
            extra["cls_loss"], dist = self.distill_loss(soft_cross_entropy(cls_logits, cls_target), dist_logits,
                                                        teacher)
            self.log_dict({"train/loss_dist": dist,
                           "train/teacher_top1": (teacher.argmax(-1) == labels).float().mean()},
                          on_step=False, on_epoch=True, batch_size=len(x))
        loss, parts = self.criterion(cls_logits, token_logits, cls_target, token_target, max_target, **extra)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(x))
        self.log_dict({"train/loss_cls": parts["cls"], "train/loss_token": parts["token"]}, on_step=False,
                      on_epoch=True, batch_size=len(x))
        return loss

    # ----- validation -----
    def _ema_callback(self) -> EMA | None:
        trainer = self._trainer
        return next((c for c in trainer.callbacks if isinstance(c, EMA)), None) if trainer is not None else None

    def _evaluate(self, batch: dict[str, Tensor], prefix: str) -> None:
        x, labels = batch["image"], batch["label"]
        ema = self._ema_callback()
        raw = ema.raw_module() if ema is not None else None
        runs = [("", self.net)] + ([("_raw", raw.net)] if raw is not None else [])
        for suffix, net in runs:
            was_training = net.training
            net.eval()  # the raw copy is not switched to eval mode by the Trainer
            logits = net(x)
            net.train(was_training)
            self.metrics["top1" + suffix].update(logits, labels)
            self.metrics["top5" + suffix].update(logits, labels)
            self.log(f"{prefix}/loss{suffix}", F.cross_entropy(logits.float(), labels), prog_bar=not suffix,
                     batch_size=len(x), sync_dist=True)
            self.log(f"{prefix}/top1{suffix}", self.metrics["top1" + suffix], prog_bar=not suffix, batch_size=len(x))
            self.log(f"{prefix}/top5{suffix}", self.metrics["top5" + suffix], batch_size=len(x))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _make_token_labels(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage != "fit" or not getattr(self.cfg, "teacher", None) or not hasattr(dm, "token_label_root"):
            return
        if dm.token_label_root() is None:  # distill without token_label_dir: the teacher makes no token labels
            return
        if self.trainer.is_global_zero:
            from models.demansia2.token_labels import load_teacher, make_token_labels

            teacher, out = self.cfg.teacher, dm.token_label_root()
            print(f"token labels: teacher {teacher} -> {out} (made once, then reused)", flush=True)
            make_token_labels(load_teacher(teacher, pretrained=not Path(teacher).expanduser().is_file()), dm.root, out)
        self.trainer.strategy.barrier("token labels")

    def configure_callbacks(self) -> list:
        return [EMA(decay=self.cfg.ema_decay, warmup=self.cfg.ema_warmup)] if self.cfg.ema else []

    # ----- inference -----
    def eval_transform(self):
        """The preprocessing that matches this model: PIL image -> (3, image_size, image_size) tensor."""
        from datamodules.imagenet import eval_transform

        return eval_transform(self.cfg.image_size, self.cfg.crop_pct)

    def predict_commands(self) -> list:
        from models.demansia2.verbs import COMMANDS

        return list(COMMANDS)

