"""Every model's default hyper-parameters and the registry name -> (LightningModule, LightningDataModule, config).

Each model has one dataclass (our defaults) and named presets that override some fields: size presets
(`micro` for CPU demos and tests, `tiny`, `small`, ...) and `published`, which reproduces the upstream project's
published configuration (see ../shared/UPSTREAM.md) so the two can be compared on the same data with one flag.
Presets compose left to right: `--preset tiny,published`.

Adding a model = one dataclass here + one `register(...)` line at the bottom.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from zoo.errors import ZooError, did_you_mean, unknown
from zoo.registry import DEFAULT_MODEL, REGISTRY, ModelEntry, get_entry, register  # noqa: F401 - re-exported


# --------------------------------------------------------------------------------------------------------------------
# Base config
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class BaseConfig:
    """Training knobs every task has. Units: lr per optimizer step, epochs over the training set."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: Literal["adamw", "adam", "lion", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6  # lr at the start of the warm-up
    min_lr: float = 1e-6  # lr at the end of the cosine decay
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    decay_epochs: float = 30.0  # step scheduler: decay the lr by decay_rate every decay_epochs
    decay_rate: float = 0.1
    sched_interval: Literal["step", "epoch"] = "step"
    no_decay_on_norm_bias: bool = True  # exclude norms, biases, SSM params and embeddings from weight decay
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    accumulate: int = 1  # gradient accumulation: effective batch = batch_size * accumulate * devices
    seed: int = 42
    num_workers: int = 2
    image_size: int = 224
    monitor: str = "val/loss"  # metric for best-k checkpoints
    monitor_mode: Literal["min", "max"] = "min"
    save_top_k: int = 1
    ckpt_every_n_steps: int = 0  # also write last.ckpt every N optimizer steps (0 = at epoch ends only)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    DEFAULT_PRESET: ClassVar[str | None] = None

    # ----- construction -----
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None = None, strict: bool = True) -> BaseConfig:
        """Build from a plain dict (e.g. a checkpoint's hyper-parameters); unknown keys are an error when strict."""
        values = dict(values or {})
        names = set(cls.field_names())
        extra = [k for k in values if k not in names]
        if extra and strict:
            raise ZooError(
                f"{cls.__name__} has no field(s) {', '.join(map(repr, extra))}.{did_you_mean(extra[0], names)} "
                f"Valid fields: {', '.join(sorted(names))}."
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce_json(v, hints[k]) for k, v in values.items() if k in names}
        return cls(**kwargs)

    @classmethod
    def from_presets(cls, presets: list[str] | str | None = None) -> BaseConfig:
        """Defaults, then each preset in order (None -> DEFAULT_PRESET)."""
        if presets is None:
            presets = [cls.DEFAULT_PRESET] if cls.DEFAULT_PRESET else []
        elif isinstance(presets, str):
            presets = [p for p in presets.split(",") if p]
        values: dict[str, Any] = {}
        for p in presets:
            if p not in cls.PRESETS:
                raise unknown("preset", p, cls.PRESETS, fix=f"(presets of {cls.__name__}; compose them with commas)")
            values.update(cls.PRESETS[p])
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> BaseConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, pairs: list[str]) -> BaseConfig:
        """Apply `key=value` strings, parsed with each field's type; errors name the key and the expected type."""
        hints = typing.get_type_hints(type(self))
        changes: dict[str, Any] = {}
        for pair in pairs:
            if "=" not in pair:
                raise ZooError(f"--set expects key=value, got '{pair}'. Example: --set lr=3e-4")
            key, raw = pair.split("=", 1)
            key = key.strip().replace("-", "_")
            if key not in hints or key.isupper():
                raise unknown("key", key, self.field_names(), fix=f"(fields of {type(self).__name__})")
            changes[key] = parse_value(raw.strip(), hints[key], key)
        return self.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_value(raw: str, tp: Any, key: str = "value") -> Any:
    """Parse a command-line string into `tp` (bool, int, float, str, Literal, Optional, tuple/list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(raw, a, key)
            except ZooError as e:
                errors.append(str(e))
        raise ZooError(f"--set {key}={raw}: expected {_type_name(tp)}. " + " ".join(errors[:1]))
    if origin is Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ZooError(f"--set {key}={raw}: must be one of {', '.join(map(str, args))}.")
    if origin in (tuple, list):
        items = json.loads(raw) if raw.startswith("[") else [s for s in raw.split(",") if s.strip()]
        elem = args[0] if args else str
        parsed = [parse_value(str(i).strip(), elem, key) for i in items]
        if origin is tuple and args and args[-1] is not Ellipsis and len(parsed) != len(args):
            raise ZooError(f"--set {key}={raw}: expected {len(args)} comma-separated values, got {len(parsed)}.")
        return tuple(parsed) if origin is tuple else parsed
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ZooError(f"--set {key}={raw}: expected a boolean (true/false).")
    if tp in (int, float):
        try:
            value = float(raw) if tp is float else int(float(raw)) if float(raw).is_integer() else None
        except ValueError:
            value = None
        if value is None:
            raise ZooError(f"--set {key}={raw}: expected {tp.__name__}, e.g. --set {key}={'3e-4' if tp is float else '8'}.")
        return value
    if tp is str:
        return raw
    if tp is Any:
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    raise ZooError(f"--set {key}: fields of type {_type_name(tp)} cannot be set from the command line.")


def _coerce_json(value: Any, tp: Any) -> Any:
    """Lists from JSON/YAML back to tuples where the field is a tuple."""
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


# --------------------------------------------------------------------------------------------------------------------
# Per-model configs (defaults = our recommended settings; `published` = the upstream recipe)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DeMansia2Config(BaseConfig):
    """DeMansia 2: bidirectional Mamba-2 classifier with token labeling (UPSTREAM.md: DeMansia 2)."""

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
    patch_size: int = 8  # stride of the stem's projection (total stride = 2 * patch_size)
    stem_channels: int = 64
    drop_path: float = 0.0
    num_classes: int = 10  # set from the data
    class_names: tuple[str, ...] = ()  # set from the data, saved in checkpoints for predict
    image_size: int = 64
    crop_pct: float = 0.875  # eval: resize to image_size / crop_pct, center crop image_size (224 <- 256)
    # training
    label_smoothing: float = 0.1
    token_label_dir: str | None = None  # LV-ViT token labels: <dir>/<class>/<stem>.pt
    token_label_weight: float = 1.0  # weight of the dense token loss
    cls_label_weight: float = 1.0  # weight of the class-token loss
    mix_token: bool = True
    aux_weight: float = 0.5  # eval logits = head(cls) + aux_weight * max_t aux_head(tokens)
    ema: bool = True
    ema_decay: float = 0.9999
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
        # CPU demo: 64 px images, 8x8 tokens, 4 layers (attention at 2); ~0.2M parameters.
        "micro": dict(d_model=64, depth=4, attn_layers=(2,), num_heads=2, attn_head_dim=32, rotary_dim=16,
                      d_state=16, headdim=16, chunk_size=64, image_size=64, patch_size=4, stem_channels=32,
                      epochs=5, batch_size=32, lr=1e-3, warmup_epochs=1.0, weight_decay=0.05, ema_decay=0.99,
                      randaugment="", random_erasing=0.0, crop_scale_min=0.5, num_workers=2),
        "tiny": dict(d_model=192, depth=24, attn_layers=(10, 20), num_heads=3, attn_head_dim=96, rotary_dim=48,
                     d_state=128, headdim=48, image_size=224, patch_size=8, stem_channels=64, num_classes=1000),
        "small": dict(d_model=384, depth=24, attn_layers=(10, 20), num_heads=6, attn_head_dim=96, rotary_dim=48,
                      d_state=128, headdim=96, image_size=224, patch_size=8, stem_channels=64, num_classes=1000),
        "published": dict(scan_mode="legacy", optimizer="lion", lr=1e-4, weight_decay=0.5, betas=(0.9, 0.99),
                          no_decay_on_norm_bias=False, warmup_epochs=10.0, warmup_lr=1e-7, min_lr=1e-6,
                          sched_interval="epoch", epochs=300, batch_size=256, accumulate=4, ema_decay=0.9999,
                          label_smoothing=0.1, drop_path=0.0, randaugment="rand-m9-mstd0.5-inc1",
                          random_erasing=0.25, crop_scale_min=0.08, mix_token=True, ema=True),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"


@dataclass
class AgeGenderConfig(BaseConfig):
    """Age regression + gender classification on a timm backbone (UPSTREAM.md: Age and gender)."""

    backbone: str = "efficientnet_b0"
    pretrained: bool = False  # True only loads weights already in the local timm/HF cache: never downloads
    head_hidden: int = 128
    dropout: float = 0.2
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
                          batch_size=32, age_loss="l1", dropout=0.0, split=(0.8, 0.2, 0.0), stratify=False,
                          monitor="val/loss", monitor_mode="min", no_decay_on_norm_bias=False),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"


@dataclass
class FaceConfig(BaseConfig):
    """Face embedding network trained with metric losses (UPSTREAM.md: Face recognition)."""

    backbone: str = "mamba"  # "mamba" = our patch-embed + Mamba-2 stack, or any timm model name
    pretrained: bool = False
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
    loss: Literal["triplet", "arcface", "cosface"] = "triplet"
    miner: Literal["all", "semihard", "hard", "none"] = "all"  # triplet miner; "all" keeps train/loss informative
    margin: float | None = None  # None = the loss's usual one: triplet 0.2, ArcFace 28.6 (degrees), CosFace 0.35
    scale: float = 64.0  # ArcFace / CosFace scale
    stage2_miner: Literal["all", "semihard", "hard", "none"] | None = None  # upstream's two-stage schedule
    stage2_epoch: int = 0  # epoch at which stage 2 starts (fresh optimiser and schedule); 0 = one stage
    num_classes: int = 0  # training identities, set from the data (ArcFace / CosFace class weights)
    augment: Literal["none", "light", "heavy"] = "light"  # heavy = upstream's augmentation list
    pairs_file: str | None = None  # pairs.txt for 10-fold verification; None = <data-dir>/pairs.txt if present
    m_per_class: int = 2  # K images per identity in each batch
    min_images_per_person: int = 2
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    optimizer: Literal["adamw", "adam", "lion", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    epochs: int = 40
    batch_size: int = 64
    monitor: str = "val/precision_at_1"
    monitor_mode: Literal["min", "max"] = "max"

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "micro": dict(d_model=64, depth=2, d_state=16, headdim=16, embedding_dim=64, image_size=64, patch_size=8,
                      epochs=15, batch_size=32, lr=2e-3, warmup_epochs=1.0),
        "tiny": dict(d_model=192, depth=12, d_state=64, headdim=48, embedding_dim=256, image_size=112),
        "small": dict(d_model=384, depth=12, d_state=64, headdim=64, embedding_dim=512, image_size=112),
        "published": dict(backbone="mamba", patch_size=8, d_model=128, depth=6, d_state=64, d_conv=4, expand=2,
                          headdim=32, bidirectional=False, pos_embed=False, embedding_dim=128, image_size=128,
                          loss="triplet", miner="all", margin=0.2, stage2_miner="hard", m_per_class=2,
                          stage2_epoch=10, optimizer="adamw", lr=3e-3, warmup_epochs=10.0, min_lr=1e-6,
                          sched_interval="epoch", epochs=20, batch_size=32, augment="heavy"),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"


@dataclass
class HandConfig(BaseConfig):
    """Hand biometrics on 11k Hands: identity, gender, age group (UPSTREAM.md: Hand biometrics). Planned."""

    image_size: int = 224
    age_bins: tuple[int, ...] = (0, 21, 22, 23, 24, 31, 76)
    label_smoothing: float = 0.1
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "micro": dict(image_size=64),
        "published": dict(optimizer="adam", lr=8e-6, weight_decay=5e-4, epochs=70, batch_size=20),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"


@dataclass
class PalmConfig(BaseConfig):
    """Palm-image diffusion generator (UPSTREAM.md: Palm synthesis). Planned."""

    image_size: int = 128
    unet_dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    timesteps: int = 1000
    sampling_timesteps: int = 250
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "micro": dict(image_size=32, unet_dim=16, dim_mults=(1, 2), timesteps=100, sampling_timesteps=20),
        "published": dict(image_size=128, unet_dim=64, dim_mults=(1, 2, 4, 8), timesteps=1000,
                          sampling_timesteps=1000, lr=2e-5, batch_size=16, accumulate=2, optimizer="adam",
                          betas=(0.9, 0.99)),
    }
    DEFAULT_PRESET: ClassVar[str | None] = "micro"


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
    summary="Hand biometrics: U-Net + VMamba 2D scan on 11k Hands (identity, gender, age) [planned]",
    status="planned",
    planned_note="the hand-biometrics task lands in a later issue (the shared SS2D/VSS blocks it needs are in "
                 "models/blocks/ss2d.py already).",
))
register(ModelEntry(
    name="palm",
    module="models.palm.module:PalmDiffusion",
    datamodule="datamodules.palms:PalmDataModule",
    config=PalmConfig,
    summary="Palm-image generator: denoising diffusion, N variations of one synthetic person [planned]",
    status="planned",
    planned_note="the palm-synthesis task lands in a later issue.",
))
