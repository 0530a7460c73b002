"""Every model's default hyper-parameters and the registry name -> (LightningModule, LightningDataModule, config).

Each model has one dataclass (our defaults) and named presets that override some fields: size presets
(`micro` for CPU demos and tests, `tiny`, `small`, ...) and `published`, which reproduces the upstream project's
published configuration (docs/<task>.md says which) so the two can be compared on the same data with one flag.
Presets compose left to right, a later one overriding the fields it names: `--preset published,micro` is the
published recipe with micro's fields on top (`tiny,published` is just `published`, which names the whole network).

Adding a model = one dataclass here + one `register(...)` line at the bottom.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from zoo.config import BaseConfig, parse_value, split_check  # noqa: F401 - re-exported (older code imports them here)
from zoo.config_checks import NON_EMPTY, Check, Each, Free, Matches, above, at_least, between, config_error
from zoo.errors import did_you_mean
from zoo.registry import DEFAULT_MODEL, REGISTRY, ModelEntry, get_entry, register  # noqa: F401 - re-exported


def mamba_width_check(cfg: Any) -> None:
    """Mamba-2 splits d_model * expand channels into heads of headdim."""
    width = cfg.d_model * cfg.expand
    if width % cfg.headdim:
        fits = [h for h in range(min(cfg.headdim, width), 0, -1) if width % h == 0][0]
        raise config_error(cfg, "headdim", f"must divide d_model * expand = {cfg.d_model} * {cfg.expand} = {width} "
                                           f"(Mamba-2 heads), e.g. headdim={fits}, or change d_model / expand")


# timm names the zoo registers (`import models`; tests/test_config_validation.py checks this list against it), so a
# config checks a backbone name without importing the networks (torch, Lightning and every task).
ZOO_TIMM_NAMES = frozenset({
    "demansia2_micro", "demansia2_tiny", "demansia2_small", "face_mamba_micro", "face_mamba_tiny", "face_mamba_small",
    "vmamba_micro_v0", "vmamba_tiny_v0", "vmamba_small_v0",
})


def backbone_name_check(cfg: Any) -> None:
    """`cfg.backbone` is `own`, one of the zoo's timm names or a timm model (`arch` or `arch.tag`), by name only:
    nothing is built (what a network needs of it, e.g. hand's feature levels, is checked when it is built)."""
    arch = cfg.backbone.split(".", 1)[0]
    if cfg.backbone == "own" or arch in ZOO_TIMM_NAMES:
        return
    import timm  # the registry of names; no network is built

    if not timm.is_model(arch):
        hint = did_you_mean(arch, [*timm.list_models(), *ZOO_TIMM_NAMES])
        raise config_error(cfg, "backbone", f"must be own (the task's network) or a timm model name: Unknown backbone "
                                            f"'{cfg.backbone}'.{hint}")


# --------------------------------------------------------------------------------------------------------------------
# Per-model configs (defaults = our recommended settings; `published` = the upstream recipe)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DeMansia2Config(BaseConfig):
    """DeMansia 2: bidirectional Mamba-2 classifier with token labeling (docs/demansia2.md)."""

    d_model: int = 96
    depth: int = 6
    attn_layers: tuple[int, ...] = (4,)  # layers whose mixer is multi-head attention instead of Mamba-2
    num_heads: int = 2  # attention heads
    attn_head_dim: int = 48  # per-head width of the attention layers (published: 96, not d_model / num_heads)
    rotary_dim: int = 24  # rotary embedding on the first rotary_dim channels of each head (published: 48)
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    headdim: int = 24
    chunk_size: int = 64
    scan_mode: Literal["bidirectional", "legacy"] = "bidirectional"  # legacy = published channel-flip mixer
    pretrained: bool = False  # start from the released Tiny EMA weights (needs --preset tiny,published; zoo.pretrained)
    patch_size: int = 8  # stride of the stem's projection (total stride = 2 * patch_size)
    stem: Literal["lvvit", "early_conv"] = "lvvit"  # lvvit = published 4-conv stem; early_conv = stride-2 3x3 stages
    stem_channels: int = 64  # lvvit: width of its convs; early_conv: width of the first stage (doubling per stage)
    drop_path: float = 0.0
    num_classes: int = 10  # set from the data
    class_names: tuple[str, ...] = ()  # set from the data, saved in checkpoints for predict
    image_size: int = 64
    crop_pct: float = 0.875  # eval: resize to image_size / crop_pct, center crop image_size (224 <- 256)
    # training
    label_smoothing: float = 0.1
    token_label_dir: str | None = None  # LV-ViT token labels: <dir>/<class>/<stem>.pt
    teacher: str | None = None  # makes missing token labels first: a zoo checkpoint, or a timm name (pretrained)
    # DeiT's hard-label distillation from `teacher` (frozen, run on each training batch): a distillation token whose
    # head learns the teacher's argmax. With distill, `teacher` makes token labels only into a given token_label_dir.
    distill: Literal["none", "hard"] = "none"
    distill_weight: float = 0.5  # DeiT's alpha: class loss = (1 - w) * CE(cls, label) + w * CE(dist, teacher argmax)
    token_label_weight: float = 1.0  # weight of the dense token loss
    cls_label_weight: float = 1.0  # weight of the class-token loss
    mix_token: bool = True
    aux_weight: float = 0.5  # eval logits = head(cls) + aux_weight * max_t aux_head(tokens)
    ema: bool = True
    ema_decay: float = 0.9999
    backbone: str = "own"  # own = the DeMansia 2 network; any timm name (resnet18, ...) = that model as classifier
    ema_warmup: bool = True  # ramp the EMA decay as (1 + t) / (10 + t) (timm); published: a constant decay
    token_label_smoothing: Literal["normalized", "lvvit"] = "normalized"  # lvvit = the published 0.9001 / 1e-4 values
    # with token labels, the class token's target: the teacher's map pooled over the crop (LV-ViT, published) or the
    # image's own label (the teacher then supervises the tokens alone: safer with a teacher weaker than the data)
    token_label_cls: Literal["teacher", "label"] = "teacher"
    train_interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"  # random = either, per image (published)
    randaugment: str = "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.25
    crop_scale_min: float = 0.08
    optimizer: Literal["adamw", "adam", "lion", "sgd"] = "lion"
    lr: float = 1e-4
    weight_decay: float = 0.5
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_epochs: float = 10.0
    warmup_lr: float = 1e-7
    epochs: int = 300
    batch_size: int = 256
    monitor: str = "val/top1"
    monitor_mode: Literal["min", "max"] = "max"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Every preset carries the whole architecture, so a preset listed after another replaces its network entirely:
        # `published` alone is the published Tiny, `published,small` the published recipe on our Small.
        # micro, the CPU preset: 64 px images, 4x4 tokens (stem stride 16) from an early-convolution stem (four 3x3
        # stride-2 stages, 24 -> 192 channels), 4 layers (attention at 2), ~0.36M parameters, no MixToken. Measured on
        # real images (benchmarks/RESULTS.md "Real data"): 8x8 tokens cost ~3x the CPU time per epoch, MixToken halves
        # what a few epochs learn, and the early-conv stem learns more per epoch than LV-ViT's at 0.74x its time.
        "micro": dict(d_model=64, depth=4, attn_layers=(2,), num_heads=2, attn_head_dim=32, rotary_dim=16,
                      d_state=16, d_conv=4, expand=2, headdim=16, chunk_size=64, image_size=64, patch_size=8,
                      stem="early_conv", stem_channels=24, num_classes=10, scan_mode="bidirectional",
                      epochs=5, batch_size=32, lr=1e-3, warmup_epochs=1.0, weight_decay=0.05, ema_decay=0.99,
                      mix_token=False, randaugment="", random_erasing=0.0, crop_scale_min=0.5, num_workers=2),
        "tiny": dict(d_model=192, depth=24, attn_layers=(10, 20), num_heads=3, attn_head_dim=96, rotary_dim=48,
                     d_state=128, d_conv=4, expand=2, headdim=48, chunk_size=64, image_size=224, patch_size=8,
                     stem="lvvit", stem_channels=64, num_classes=1000, scan_mode="bidirectional", mix_token=True),
        "small": dict(d_model=384, depth=24, attn_layers=(10, 20), num_heads=6, attn_head_dim=96, rotary_dim=48,
                      d_state=128, d_conv=4, expand=2, headdim=96, chunk_size=64, image_size=224, patch_size=8,
                      stem="lvvit", stem_channels=64, num_classes=1000, scan_mode="bidirectional", mix_token=True),
        # The published network (Tiny, chunk 256, the channel-flip "bidirectional" mixer) and recipe (docs/demansia2.md).
        "published": dict(d_model=192, depth=24, attn_layers=(10, 20), num_heads=3, attn_head_dim=96, rotary_dim=48,
                          d_state=128, d_conv=4, expand=2, headdim=48, chunk_size=256, image_size=224, patch_size=8,
                          stem="lvvit", stem_channels=64, num_classes=1000, crop_pct=0.875,
                          scan_mode="legacy", optimizer="lion", lr=1e-4, weight_decay=0.5, betas=(0.9, 0.99),
                          no_decay_on_norm_bias=False, warmup_epochs=10.0, warmup_lr=1e-7, min_lr=1e-6,
                          scheduler="cosine", sched_interval="epoch", epochs=300, batch_size=256, accumulate=4,
                          ema=True, ema_decay=0.9999, ema_warmup=False, label_smoothing=0.1,
                          token_label_smoothing="lvvit", token_label_weight=1.0, cls_label_weight=1.0, aux_weight=0.5,
                          drop_path=0.0, randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25,
                          crop_scale_min=0.08, train_interpolation="random", mix_token=True, grad_clip=0.0),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"
    CHECKS: ClassVar[dict[str, Check]] = {
        "d_model": at_least(1), "depth": at_least(1), "attn_layers": Each(at_least(0)), "num_heads": at_least(1),
        "attn_head_dim": at_least(1), "rotary_dim": at_least(0), "d_state": at_least(1), "d_conv": at_least(1),
        "expand": at_least(1), "headdim": at_least(1), "chunk_size": at_least(1), "patch_size": at_least(1),
        "stem_channels": at_least(1), "drop_path": between(0, 1, hi_open=True), "num_classes": at_least(1),
        "class_names": Free("set from the data; its length is checked against num_classes"),
        "crop_pct": between(0, 1, lo_open=True), "label_smoothing": between(0, 1, hi_open=True),
        "token_label_dir": Free("a folder, checked when the data loads"),
        "teacher": Free("a classifier checkpoint or a timm name, checked when the data loads"), "token_label_weight": at_least(0),
        "cls_label_weight": at_least(0), "aux_weight": at_least(0), "distill_weight": between(0, 1),
        "ema_decay": between(0, 1, hi_open=True),
        "backbone": NON_EMPTY, "random_erasing": between(0, 1), "crop_scale_min": between(0, 1, lo_open=True),
        "randaugment": Matches(r"((rand|augmix|original|originalr|v0|v0r|3a)(-[\w.]+)*)?",
                               "empty (off) or a timm auto-augment string such as rand-m9-mstd0.5-inc1", "bogus"),
    }

    def check(self) -> None:
        super().check()
        if self.class_names and len(self.class_names) != self.num_classes:
            raise config_error(self, "class_names", f"must name num_classes={self.num_classes} classes, not "
                                                    f"{len(self.class_names)} (or be empty)")
        if self.distill != "none" and not self.teacher:
            raise config_error(self, "distill", "needs a teacher: add --set teacher=CKPT (a classifier checkpoint "
                                                "trained on this data) or --set teacher=TIMM_NAME")
        if self.distill != "none" and self.backbone != "own":
            raise config_error(self, "distill", f"needs the DeMansia 2 network (its distillation token); "
                                                f"backbone={self.backbone} has none: use --set backbone=own")
        if self.backbone != "own":
            return  # a timm classifier: the fields below describe our network only
        mamba_width_check(self)
        stride = 2 * self.patch_size
        if self.image_size % stride:
            raise config_error(self, "image_size", f"must be a multiple of 2 * patch_size = {stride} (the stem's "
                                                   f"stride), e.g. {max(stride, self.image_size // stride * stride)}")
        wrong = [i for i in self.attn_layers if i >= self.depth]
        if wrong:
            raise config_error(self, "attn_layers", f"must be layer indices below depth={self.depth}; {wrong[0]} is "
                                                    f"not")
        if self.rotary_dim > self.attn_head_dim or self.rotary_dim % 2:
            raise config_error(self, "rotary_dim", f"must be even and at most attn_head_dim={self.attn_head_dim}")


@dataclass
class AgeGenderConfig(BaseConfig):
    """Age regression + gender classification on a timm backbone (docs/agegender.md)."""

    backbone: str = "efficientnet_b0"
    pretrained: bool = False  # timm / HF hub weights: downloaded when online, the local cache offline
    init_from: str | None = None  # a zoo checkpoint (e.g. demansia2's) whose network starts the backbone
    head_hidden: int = 128
    head_dropout: float = 0.2  # on the pooled features entering the age and gender heads
    max_age: float = 116.0
    age_loss: Literal["l1", "smooth_l1"] = "smooth_l1"  # on age / max_age
    age_beta: float = 2.0  # smooth-L1 transition in years: quadratic below, linear above
    age_weight: float = 1.0
    gender_weight: float = 1.0
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test fractions
    stratify: bool = True  # stratify the split by age decade and gender
    image_size: int | None = None  # None = the backbone's own input size (timm data config)
    optimizer: Literal["adamw", "adam", "lion", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    epochs: int = 50
    batch_size: int = 32
    warmup_epochs: float = 1.0
    monitor: str = "val/age_mae"
    monitor_mode: Literal["min", "max"] = "min"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "micro": dict(backbone="resnet10t", image_size=64, epochs=15, batch_size=32, lr=1e-3, warmup_epochs=0.5),
        "published": dict(backbone="efficientnet_b0", pretrained=True, image_size=224, optimizer="adam", lr=1e-4,
                          weight_decay=0.0, scheduler="step", decay_epochs=20.0, decay_rate=0.1, sched_interval="epoch",
                          warmup_epochs=0.0, epochs=50,
                          batch_size=32, age_loss="l1", head_dropout=0.0, split=(0.8, 0.2, 0.0), stratify=False,
                          monitor="val/loss", monitor_mode="min", no_decay_on_norm_bias=False),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"
    CHECKS: ClassVar[dict[str, Check]] = {
        "backbone": NON_EMPTY, "init_from": Free("a checkpoint path, checked when it is opened"),
        "head_hidden": at_least(1), "head_dropout": between(0, 1, hi_open=True), "max_age": above(0),
        "age_beta": above(0), "age_weight": at_least(0), "gender_weight": at_least(0), "split": Each(between(0, 1)),
    }

    def check(self) -> None:
        super().check()
        split_check(self)
        if self.age_weight + self.gender_weight <= 0:
            raise config_error(self, "age_weight", "and gender_weight must not both be 0 (nothing would be learned)")


@dataclass
class FaceConfig(BaseConfig):
    """Face embedding network trained with metric losses (docs/face.md)."""

    backbone: str = "own"  # own = our stem + Mamba-2 encoder, or any timm model name
    pretrained: bool = False
    init_from: str | None = None  # a zoo checkpoint (face, demansia2, agegender) whose network starts the encoder
    stem: Literal["patch", "conv"] = "patch"  # patch = one p x p conv (upstream); conv = 3 convs + p x p (stride 2p)
    stem_channels: int = 32  # width of the conv stem's convolutions
    patch_size: int = 8
    d_model: int = 128
    depth: int = 6
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 32
    bidirectional: bool = True
    pos_embed: bool = True
    embedding_dim: int = 256
    image_size: int = 128
    metric_loss: Literal["triplet", "arcface", "cosface"] = "triplet"
    miner: Literal["all", "semihard", "hard", "none"] = "all"  # triplet miner; "all" keeps train/loss informative
    margin: float | None = None  # None = the loss's usual one: triplet 0.2, ArcFace 28.6 (degrees), CosFace 0.35
    scale: float = 64.0  # ArcFace / CosFace scale
    stage2_miner: Literal["all", "semihard", "hard", "none"] | None = None  # upstream's two-stage schedule
    stage2_epoch: int = 0  # epoch at which stage 2 starts (fresh optimiser and schedule); 0 = one stage
    stage2_from_best: bool = False  # stage 2 restarts from the best stage-1 weights (by the monitor), as published
    early_stopping_patience: int = 0  # stop a stage after this many epochs without a better monitor value; 0 = off
    num_identities: int = 0  # training identities, set from the data (ArcFace / CosFace class weights)
    augment: Literal["none", "light", "heavy"] = "light"  # heavy = upstream's augmentation list
    pairs_file: str | None = "auto"  # LFW pairs file for verification; auto = pairs.txt beside the images; none = off
    m_per_class: int = 2  # K images per identity in each batch
    min_images_per_person: int = 2
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    optimizer: Literal["adamw", "adam", "lion", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    epochs: int = 40
    batch_size: int = 64
    monitor: str = "val/rank1"
    monitor_mode: Literal["min", "max"] = "max"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Every preset carries the whole network (backbone and every architecture field), so presets compose
        # predictably: the last one listed decides the network.
        # micro (CPU): a convolutional stem of stride 8 (8x8 tokens at 64 px) before 2 bidirectional Mamba-2 layers.
        # On real faces (ORL, benchmarks/RESULTS.md "Real data") it lifts R-precision 0.57 -> 0.70 over the patch conv.
        "micro": dict(backbone="own", stem="conv", stem_channels=32, patch_size=4, d_model=64, depth=2, d_state=16,
                      d_conv=4, expand=2, headdim=16, bidirectional=True, pos_embed=True, embedding_dim=64,
                      image_size=64, epochs=15, batch_size=32, lr=2e-3, warmup_epochs=1.0),
        "tiny": dict(backbone="own", stem="patch", stem_channels=32, patch_size=8, d_model=192, depth=12, d_state=64,
                     d_conv=4, expand=2, headdim=48, bidirectional=True, pos_embed=True, embedding_dim=256,
                     image_size=112),
        "small": dict(backbone="own", stem="patch", stem_channels=32, patch_size=8, d_model=384, depth=12,
                      d_state=64, d_conv=4, expand=2, headdim=64, bidirectional=True, pos_embed=True, embedding_dim=512,
                      image_size=112),
        "published": dict(backbone="own", stem="patch", stem_channels=32, patch_size=8, d_model=128, depth=6,
                          d_state=64, d_conv=4, expand=2, headdim=32, bidirectional=False, pos_embed=False,
                          embedding_dim=128, image_size=128,
                          metric_loss="triplet", miner="all", margin=0.2, stage2_miner="hard", m_per_class=2,
                          stage2_epoch=10, stage2_from_best=True, early_stopping_patience=10, optimizer="adamw",
                          lr=3e-3, warmup_epochs=10.0, min_lr=1e-6, sched_interval="epoch", epochs=20, batch_size=32,
                          augment="heavy"),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"
    CHECKS: ClassVar[dict[str, Check]] = {
        "backbone": NON_EMPTY, "patch_size": at_least(1), "stem_channels": at_least(1), "d_model": at_least(1),
        "depth": at_least(1), "d_state": at_least(1), "d_conv": at_least(1), "expand": at_least(1),
        "headdim": at_least(1), "embedding_dim": at_least(1), "margin": above(0), "scale": above(0),
        "stage2_epoch": at_least(0),
        "early_stopping_patience": at_least(0), "num_identities": at_least(0),
        "pairs_file": Free("a file (or auto / none), checked when the data loads"), "m_per_class": at_least(1),
        "init_from": Free("a checkpoint path, checked when it is opened"),
        "min_images_per_person": at_least(1), "split": Each(between(0, 1)),
    }

    def check(self) -> None:
        super().check()
        split_check(self)
        if self.backbone == "own":
            mamba_width_check(self)
            stride = self.patch_size * (2 if self.stem == "conv" else 1)
            if self.image_size < stride:
                stride_of = f"2 * patch_size = {stride}" if self.stem == "conv" else f"patch_size = {stride}"
                raise config_error(self, "image_size", f"must be at least {stride_of} (the {self.stem} stem's stride)")


@dataclass
class HandConfig(BaseConfig):
    """Hand biometrics on 11k Hands: a VMamba v0 encoder + SUM-style U-Net decoder with identity, gender and age-group
    heads and an embedding for open-set identification (docs/hand.md)."""

    # data and protocol
    protocol: Literal["closed_set", "open_set"] = "closed_set"  # closed_set = upstream's per-aspect 80/20 split
    val_fraction: float = 0.2  # closed set: share of each aspect's rows in validation (stratified by subject)
    split_seed: int = 42  # the protocols' split seed (upstream: 42), independent of the training seed
    open_val_identities: float = 0.2  # open set: share of the training half's identities held out for validation
    gallery_draws: int = 10  # open set: seeded random gallery draws the retrieval metrics are averaged over
    aspects: tuple[str, ...] = ()  # aspects to keep ("palmar right", "dorsal left", ...); empty = all four
    keep_accessories: bool = False  # upstream drops rows with accessories
    skip_missing_images: bool = False  # CSV rows without an image file: skipped with a report instead of an error
    age_bins: tuple[int, ...] = (0, 21, 22, 23, 24, 31, 76)  # right-open age groups
    silhouette_threshold: int = 40  # a pixel is hand when 255 - min(R, G, B) exceeds this (white background)
    image_size: int = 224
    # network
    encoder: Literal["micro", "tiny", "small"] = "tiny"  # VMamba v0 size (with a timm backbone: the dims it maps to)
    backbone: str = "own"  # own = the VMamba v0 encoder; any timm name = its levels at strides 4-32, projected
    # the encoder's released weights (a new run only): VMamba v0 Tiny / Small (zoo.pretrained), or a timm backbone's;
    # on in `published` (upstream's frozen VMamba-S), skipped when pretrained_ckpt names the file to start from
    pretrained: bool = False
    pretrained_ckpt: str | None = None  # VMamba v0 ImageNet checkpoint (.pth, its `model` entry) for the encoder
    pretrained_ema: bool = False  # take the release's EMA weights (`model_ema`) instead of `model`
    drop_path: float = 0.1
    decoder: bool = True  # the SUM U-Net decoder (its features feed the heads, its output the silhouette)
    head: Literal["multiscale", "published"] = "multiscale"  # published = sigmoid, flatten, three MLP heads
    head_dropout: float = 0.2
    embedding_dim: int = 128
    freeze_encoder_epochs: int = 0  # encoder frozen for the first N epochs; -1 = for the whole run
    # losses
    label_smoothing: float = 0.1
    identity_weight: float = 1.0
    gender_weight: float = 1.0
    age_weight: float = 1.0
    metric_loss: Literal["arcface", "cosface", "triplet"] = "arcface"  # on the embedding (losses.metric)
    metric_weight: float = 0.2  # 0 turns the embedding loss off (ArcFace at scale 30 would drown the CE heads at 1)
    margin: float | None = None  # None = the loss's usual one (ArcFace 28.6 degrees)
    scale: float = 30.0  # ArcFace / CosFace scale
    silhouette_weight: float = 0.5  # the decoder's dense auxiliary loss; 0 turns it off
    # schedule extras
    decay_milestones: tuple[int, ...] = ()  # epochs where the lr is multiplied by decay_rate (replaces `scheduler`)
    early_stopping_patience: int = 0  # epochs without a better `monitor` before stopping; 0 = off
    # set from the data (saved in checkpoints for predict.py)
    num_identities: int = 2
    num_age_groups: int = 6
    identity_names: tuple[str, ...] = ()
    gender_names: tuple[str, ...] = ("female", "male")
    optimizer: Literal["adamw", "adam", "lion", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 30
    batch_size: int = 32
    warmup_epochs: float = 1.0
    monitor: str = "val/rank1"
    monitor_mode: Literal["min", "max"] = "max"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "micro": dict(encoder="micro", image_size=64, drop_path=0.0, epochs=10, batch_size=16, lr=2e-3,
                      warmup_epochs=0.5, head="multiscale", decoder=True, num_workers=0, pretrained=False),
        "tiny": dict(encoder="tiny", image_size=224, drop_path=0.1, head="multiscale", decoder=True),
        "small": dict(encoder="small", image_size=224, drop_path=0.3, head="multiscale", decoder=True),
        # Upstream's effective model and intended recipe: frozen VMamba-S, sigmoid(stage 4) flattened into three
        # MLP heads, CE with label smoothing 0.1 summed 1:1:1, Adam, warm-up 8e-6 -> 8e-4 over 10 epochs, 4e-4 from
        # epoch 30, 70 epochs, early stopping (patience 5) on the validation loss, batch 20. The encoder starts from
        # VMamba's released v0 Small (`pretrained`: fetched once into the weights cache; off in `published,micro`).
        "published": dict(encoder="small", pretrained=True, image_size=224, drop_path=0.0, decoder=False,
                          head="published", freeze_encoder_epochs=-1, metric_weight=0.0, silhouette_weight=0.0,
                          label_smoothing=0.1, identity_weight=1.0, gender_weight=1.0, age_weight=1.0, head_dropout=0.5,
                          optimizer="adam", lr=8e-4, warmup_lr=8e-6, warmup_epochs=10.0, weight_decay=5e-4,
                          decay_milestones=(30,), decay_rate=0.5, sched_interval="epoch", epochs=70, batch_size=20,
                          no_decay_on_norm_bias=False, early_stopping_patience=5, monitor="val/loss",
                          monitor_mode="min", protocol="closed_set", keep_accessories=False, split_seed=42),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"
    CHECKS: ClassVar[dict[str, Check]] = {
        "val_fraction": between(0, 1, lo_open=True, hi_open=True), "split_seed": between(0, 2**32 - 1),
        "open_val_identities": between(0, 1, hi_open=True), "gallery_draws": at_least(1),
        "aspects": Each(Matches(r"(?i)(palmar|dorsal) (right|left)",
                                "an aspect: palmar right, palmar left, dorsal right or dorsal left", "palm")),
        "age_bins": Each(at_least(0)), "silhouette_threshold": between(0, 254), "backbone": NON_EMPTY,
        "pretrained_ckpt": Free("a VMamba v0 checkpoint path, checked when it is opened"),
        "drop_path": between(0, 1, hi_open=True), "head_dropout": between(0, 1, hi_open=True),
        "embedding_dim": at_least(1), "freeze_encoder_epochs": at_least(-1),
        "label_smoothing": between(0, 1, hi_open=True), "identity_weight": at_least(0), "gender_weight": at_least(0),
        "age_weight": at_least(0), "metric_weight": at_least(0), "margin": above(0), "scale": above(0),
        "silhouette_weight": at_least(0), "decay_milestones": Each(at_least(1)), "early_stopping_patience": at_least(0),
        "num_identities": at_least(1), "num_age_groups": at_least(1),
        "identity_names": Free("set from the data (the training subjects' ids)"),
        "gender_names": Free("set from the data"),
    }

    def check(self) -> None:
        super().check()
        if self.image_size % 32:
            raise config_error(self, "image_size", "must be a multiple of 32 (VMamba's stride; the U-Net adds skips)")
        if self.backbone == "own":
            if self.pretrained and not self.pretrained_ckpt and self.encoder not in ("tiny", "small"):
                raise config_error(self, "pretrained", f"needs encoder=tiny or small (VMamba v0's releases) or a "
                                                       f"timm backbone; encoder={self.encoder} has none (--set "
                                                       f"pretrained=false, or a VMamba v0 file with --set "
                                                       f"pretrained_ckpt=PATH)")
        else:
            if self.pretrained_ckpt:
                raise config_error(self, "pretrained_ckpt", "is a VMamba v0 checkpoint: it needs backbone=own "
                                                            "(a timm backbone takes --set pretrained=true)")
            backbone_name_check(self)
        bins = tuple(self.age_bins)
        if len(bins) < 2 or any(b <= a for a, b in zip(bins, bins[1:])):
            raise config_error(self, "age_bins", "must be at least two increasing ages (right-open groups)")


@dataclass
class PalmConfig(BaseConfig):
    """Palm-image diffusion generator (docs/palm.md).

    Denoiser: denoising-diffusion-pytorch's `Unet(unet_dim, dim_mults)`; with `mixer="vss"` its attention at the
    innermost `vss_levels` resolutions (and the middle block) is replaced by the zoo's 2D selective-scan `VSSBlock`.
    Diffusion: the library's `GaussianDiffusion` (`timesteps` training steps, `objective`, `beta_schedule`); samples
    with DDIM in `sampling_steps` steps (eta `ddim_eta`) from the EMA weights (ema-pytorch, as the library's trainer:
    decay `ema_decay`, updated every `ema_update_every` optimizer steps, copied outright before
    `ema_update_after_step`). Images in [0, 1] at `image_size` px; `max_steps` > 0 ends training after that many
    optimizer steps (the upstream recipe counts steps, not epochs).
    """

    image_size: int = 64
    unet_dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    mixer: Literal["vss", "attention"] = "vss"  # attention = the library's Unet unchanged (upstream)
    vss_levels: int = 2  # innermost resolutions whose attention becomes a VSSBlock (the middle block always does)
    vss_d_state: int = 16
    vss_expand: int = 2
    dropout: float = 0.0  # inside the U-Net's ResNet blocks (the library's Unet `dropout`)
    # a new run starts from zebracon7's released model-88.pt (its EMA weights, zoo.pretrained) instead of random
    # weights: needs the released network (--preset published); off in every preset, `published` included, whose
    # recipe trains from scratch (`predict.py --ckpt release:palm` opens the release to sample)
    pretrained: bool = False
    timesteps: int = 1000
    objective: Literal["pred_noise", "pred_x0", "pred_v"] = "pred_v"
    beta_schedule: Literal["linear", "cosine", "sigmoid"] = "sigmoid"
    sampling_steps: int = 50  # DDIM steps for samples, grids and `generate`
    ddim_eta: float = 0.0  # 0 = deterministic DDIM; 1 with sampling_steps = timesteps = the ancestral DDPM chain
    ema_decay: float = 0.995
    ema_update_every: int = 10
    ema_update_after_step: int = 100
    hflip: bool = True
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train / val / test fractions of the images (seeded)
    strict_data: bool = False  # unreadable image files are an error instead of being reported and skipped
    grid_every_n_steps: int = 500  # sample grid (PNG in the run folder + W&B) every N optimizer steps; 0 = off
    grid_samples: int = 16
    max_steps: int = 0  # stop after this many optimizer steps (0 = `epochs` decides; --max-steps wins)
    optimizer: Literal["adamw", "adam", "lion", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_epochs: float = 1.0
    epochs: int = 200
    batch_size: int = 32
    monitor: str = "val/loss"
    monitor_mode: Literal["min", "max"] = "min"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Every preset carries the whole network. micro: CPU tests and demo, 32 px, ~0.5M parameters.
        "micro": dict(image_size=32, unet_dim=16, dim_mults=(1, 2, 4), mixer="vss", vss_levels=1, vss_d_state=8,
                      timesteps=200, sampling_steps=20, ema_decay=0.99, ema_update_every=1, ema_update_after_step=10,
                      epochs=20, batch_size=16, lr=1e-3, warmup_epochs=1.0, grid_every_n_steps=100, grid_samples=16),
        "tiny": dict(image_size=64, unet_dim=32, dim_mults=(1, 2, 4, 8), mixer="vss", vss_levels=2, vss_d_state=16,
                     timesteps=1000, sampling_steps=50),
        "small": dict(image_size=128, unet_dim=64, dim_mults=(1, 2, 4, 8), mixer="vss", vss_levels=2, vss_d_state=16,
                      timesteps=1000, sampling_steps=50),
        # zebracon7/diffusion_wgan-gp_img_gen: the library's Unet and trainer defaults; 50k steps, full DDPM sampling.
        "published": dict(image_size=128, unet_dim=64, dim_mults=(1, 2, 4, 8), mixer="attention", dropout=0.0,
                          timesteps=1000, sampling_steps=1000, objective="pred_noise", beta_schedule="sigmoid",
                          ddim_eta=1.0, optimizer="adam", lr=2e-5, betas=(0.9, 0.99), weight_decay=0.0,
                          no_decay_on_norm_bias=False, scheduler="constant", warmup_epochs=0.0, batch_size=16,
                          accumulate=2, ema_decay=0.995, ema_update_every=10, ema_update_after_step=100, hflip=True,
                          max_steps=50_000, epochs=100_000, grid_every_n_steps=500, grid_samples=25),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"
    CHECKS: ClassVar[dict[str, Check]] = {
        "image_size": at_least(8), "unet_dim": at_least(1), "dim_mults": Each(at_least(1)), "vss_levels": at_least(0),
        "vss_d_state": at_least(1), "vss_expand": at_least(1), "dropout": between(0, 1, hi_open=True),
        "timesteps": at_least(1), "sampling_steps": at_least(1), "ddim_eta": between(0, 1),
        "ema_decay": between(0, 1, hi_open=True), "ema_update_every": at_least(1), "ema_update_after_step": at_least(0),
        "split": Each(between(0, 1)), "grid_every_n_steps": at_least(0), "grid_samples": at_least(1),
        "max_steps": at_least(0),
    }

    def check(self) -> None:
        super().check()
        split_check(self)
        if self.pretrained and self.mixer != "attention":
            raise config_error(self, "pretrained", "loads the released model-88.pt, the library's Unet: it needs "
                                                   "mixer=attention (--preset published)")
        if self.vss_levels > len(self.dim_mults):
            raise config_error(self, "vss_levels", f"must be at most len(dim_mults) = {len(self.dim_mults)}")
        if self.image_size % 2 ** (len(self.dim_mults) - 1):
            raise config_error(self, "image_size", f"must be divisible by 2 ** (len(dim_mults) - 1) = "
                                                   f"{2 ** (len(self.dim_mults) - 1)} (the U-Net's down-sampling)")


# --------------------------------------------------------------------------------------------------------------------
# Registry: one entry per task (its LightningModule and DataModule are imported only when used)
# --------------------------------------------------------------------------------------------------------------------
register(ModelEntry(
    name="demansia2",
    module="models.demansia2.module:DeMansia2",
    datamodule="datamodules.imagenet:ImageNetDataModule",
    config=DeMansia2Config,
    summary="DeMansia 2: bidirectional Mamba-2 ImageNet classifier, token labeling, EMA (presets micro/tiny/small)",
))
register(ModelEntry(
    name="agegender",
    module="models.agegender.module:AgeGender",
    datamodule="datamodules.utkface:UTKFaceDataModule",
    config=AgeGenderConfig,
    summary="Age regression + gender classification on any timm backbone (ours included), UTKFace",
))
register(ModelEntry(
    name="face",
    module="models.face.module:FaceEmbedder",
    datamodule="datamodules.lfw:LFWDataModule",
    config=FaceConfig,
    summary="Face embeddings (patch conv + Mamba-2) with triplet/ArcFace/CosFace, LFW verification and retrieval",
))
register(ModelEntry(
    name="hand",
    module="models.hand.module:HandBiometrics",
    datamodule="datamodules.hands11k:Hands11kDataModule",
    config=HandConfig,
    summary="Hand biometrics: VMamba v0 U-Net on 11k Hands (identity, gender, age group; open-set enrolment)",
))
register(ModelEntry(
    name="palm",
    module="models.palm.module:PalmDiffusion",
    datamodule="datamodules.palms:PalmDataModule",
    config=PalmConfig,
    summary="Palm-image generator: diffusion U-Net with VSS blocks, EMA, DDIM; identity-keeping variations",
))
