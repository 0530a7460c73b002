"""Convert the released "DeMansia 2 Tiny EMA.ckpt" (catalpaaa/DeMansia-2) into a checkpoint of this zoo.

    python -m models.demansia2.convert "DeMansia 2 Tiny EMA.ckpt" checkpoints/demansia2_tiny_released.ckpt
    python predict.py --ckpt checkpoints/demansia2_tiny_released.ckpt classify photo.jpg

The released file is a Lightning checkpoint whose `state_dict` holds the EMA weights under the backbone's own names
(no `model.` prefix) and whose `hyper_parameters` hold the constructor arguments. Our backbone uses the same names,
so conversion = every key gets the `model.` prefix, after checking that the key set and every shape match a
`tiny,published` (legacy scan) DeMansia 2; the config comes from the released hyper-parameters. The result opens
with `DeMansia2.load_from_checkpoint(path)` on the CPU and with `predict.py`.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

import torch

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


def _release() -> dict[str, Any]:
    from models.demansia2.model import RELEASES

    return {**RELEASES["tiny"], "license": "apache-2.0"}


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


def checked_state(ckpt: dict[str, Any], src: str | Path) -> tuple[dict[str, torch.Tensor], DeMansia2Config]:
    """The released network's state_dict (DeMansia2Net names) and config, after checking every key and shape against
    a network built from the released hyper-parameters. Raises ZooError naming missing / unexpected / misshapen keys."""
    from models.demansia2.model import DeMansia2Net, net_kwargs

    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in ckpt["state_dict"].items()
             if isinstance(v, torch.Tensor)}
    cfg = config_from_released(ckpt.get("hyper_parameters") or {})
    with torch.device("meta"):
        expected = DeMansia2Net(**net_kwargs(cfg)).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ZooError(f"{src}: the keys do not match a DeMansia 2 ({cfg.d_model} wide, {cfg.depth} layers, attention at "
                       f"{list(cfg.attn_layers)}). Missing: {_short(missing)}. Unexpected: {_short(unexpected)}.")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ZooError(f"{src}: shape mismatch for {_short(wrong)}.")
    return state, cfg


def released_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The released file as `demansia2_tiny(pretrained=True)`'s state_dict (`zoo.pretrained` caches it)."""
    return checked_state(read_released(path), path)[0]


def from_release(ckpt: Any, src: str | Path) -> dict[str, Any] | None:
    """The zoo checkpoint dict for the released Lightning checkpoint (None when `ckpt` is not one: no `state_dict`
    with DeMansia 2's `cls_token` / `pos_embed` at the top level)."""
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not {"cls_token", "pos_embed"} <= {k.removeprefix("model.") for k in sd}:
        return None
    from models.demansia2.module import DeMansia2

    state, cfg = checked_state(ckpt, src)
    cfg = cfg.replace(class_names=imagenet_class_names(cfg.num_classes))
    import lightning

    return {
        "state_dict": {f"net.{k}": v.detach().clone().contiguous() for k, v in state.items()},
        "hyper_parameters": {"config": cfg.to_dict(), "task": DeMansia2.TASK},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": _int(ckpt.get("epoch")),
        "global_step": _int(ckpt.get("global_step")),
        "converted_from": str(Path(src).name),
    }


def convert(src: str | Path, dst: str | Path, trust: bool = False) -> Path:
    """Write a zoo checkpoint for the released one; returns dst. Raises ZooError on missing/unexpected keys or
    shape mismatches, naming them."""
    ckpt = read_released(src, trust=trust)
    out = from_release(ckpt, src)
    if out is None:
        checked_state(ckpt, src)  # raises, naming the keys that do not match
        raise ZooError(f"{src}: not DeMansia 2's released checkpoint.")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, dst)
    return dst


def _int(v: Any) -> int:
    return int(v) if isinstance(v, (int, float)) else 0


def _short(names: list[str], n: int = 8) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the released Lightning checkpoint, e.g. 'DeMansia 2 Tiny EMA.ckpt'")
    p.add_argument("dst", help="where to write the zoo checkpoint")
    p.add_argument("--trust-checkpoint", action="store_true", help="unpickle src in full, which can run code: only "
                   "for a file you trust that holds types beyond tensors and plain data")
    args = p.parse_args(argv)
    try:
        dst = convert(args.src, args.dst, trust=args.trust_checkpoint)
    except ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst}: open it with DeMansia2.load_from_checkpoint('{dst}') or "
          f"`python predict.py --ckpt '{dst}' classify IMAGE...`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
