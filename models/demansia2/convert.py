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
from pathlib import Path
from typing import Any

import torch

from models.demansia2.model import checked_state, released_state  # noqa: F401 - the converter's public names
from models.demansia2.release import config_from_released, imagenet_class_names, read_released  # noqa: F401
from zoo.errors import ZooError


def _release() -> dict[str, Any]:
    from models.demansia2.model import RELEASES

    return {**RELEASES["tiny"], "license": "apache-2.0"}


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
