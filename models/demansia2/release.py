"""DeMansia 2's released checkpoint read as data: the file (`read_released`), the config its hyper-parameters state
(`config_from_released`) and ImageNet's class names. No network here: `models.demansia2.model` checks the tensors
against the network (`checked_state`), `models.demansia2.convert` writes a zoo checkpoint."""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from model_config import DeMansia2Config
from zoo.errors import ZooError


def read_released(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """The released checkpoint as data (`zoo.checkpoint.safe_load`: tensors and plain values only, no code runs).

    With `trust` (the `--trust-checkpoint` flag) it is unpickled in full, and classes pickled from `pytorch_lightning`
    resolve to `lightning.pytorch`.
    """
    from zoo.checkpoint import safe_load

    path = Path(path)
    if not path.is_file():
        raise ZooError(f"{path} not found. Download 'DeMansia 2 Tiny EMA.ckpt' from the DeMansia-2 release page "
                       f"and pass its path.")
    if trust and "pytorch_lightning" not in sys.modules:
        try:
            import pytorch_lightning  # noqa: F401
        except ImportError:
            import lightning.pytorch as lp

            alias = types.ModuleType("pytorch_lightning")
            alias.__dict__.update(lp.__dict__)
            sys.modules["pytorch_lightning"] = alias
    try:
        ckpt = safe_load(path, "released checkpoint", trust=trust)
    except ZooError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ZooError(f"Cannot read {path}: {type(e).__name__}: {str(e)[:200]}. Is it the released .ckpt file, "
                       f"complete (the Tiny checkpoint is ~115 MB)?") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ZooError(f"{path} has no 'state_dict': not a Lightning checkpoint of DeMansia 2.")
    return ckpt


def config_from_released(hparams: dict[str, Any]) -> DeMansia2Config:
    """The `tiny,published` config with the sizes the released hyper-parameters state."""
    cfg = DeMansia2Config.from_presets("tiny,published")
    ssm, attn = dict(hparams.get("ssm_cfg") or {}), dict(hparams.get("attn_cfg") or {})
    img = hparams.get("img_size", (224, 224))
    patch = hparams.get("patch_size", (16, 16))
    img = img[0] if isinstance(img, (tuple, list)) else img
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    changes = dict(
        d_model=hparams.get("d_model", cfg.d_model), depth=hparams.get("depth", cfg.depth),
        num_classes=hparams.get("num_classes", cfg.num_classes),
        attn_layers=tuple(hparams.get("attn_layer_idx", cfg.attn_layers)),
        headdim=ssm.get("headdim", cfg.headdim), d_state=ssm.get("d_state", cfg.d_state),
        d_conv=ssm.get("d_conv", cfg.d_conv), expand=ssm.get("expand", cfg.expand),
        num_heads=attn.get("num_heads", cfg.num_heads), attn_head_dim=attn.get("head_dim", cfg.attn_head_dim),
        rotary_dim=attn.get("rotary_emb_dim", cfg.rotary_dim), image_size=int(img), patch_size=int(patch) // 2,
        scan_mode="legacy",
    )
    if attn.get("d_conv", cfg.d_conv) != changes["d_conv"]:
        raise ZooError("The released attention conv width differs from the Mamba conv width; this zoo shares one "
                       "d_conv for both. Edit the converter if you need both.")
    return cfg.replace(**changes)


def imagenet_class_names(num_classes: int) -> tuple[str, ...]:
    """ImageNet-1k names in wnid order (from timm's bundled metadata, no download), when there are 1000 classes."""
    if num_classes != 1000:
        return ()
    from timm.data import ImageNetInfo

    return tuple(d.split(",")[0].strip() for d in ImageNetInfo().label_descriptions())


def short_list(names: list[str], n: int = 8) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")
