"""Building a network from a file's config without trusting that config (`fit_on_meta`).

A checkpoint or `.safetensors` export carries its config; a crafted (or damaged) file can ask for a network far larger
than its tensors (`embedding_dim` 10**9). Before anything is allocated, the config passes the same checks as the
command line (`zoo.config_checks`, with `SIZE_LIMITS` on the fields that size memory), then the network is built on
the meta device (shapes only, no storage) and every tensor shape is compared with the file's. Only a file whose config
describes its own tensors is then built for real.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError

REEXPORT = "The file was edited or not written by this zoo: re-export it from its .ckpt, or ask its author for one."


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def fit_on_meta(cls: type, config: Any, task: str, ckpt: dict[str, Any], path: str | Path = "") -> None:
    """Raise a ZooError when `config` is invalid or the `cls` network it describes does not have the shapes of
    `ckpt["state_dict"]` (or lacks tensors a strict load needs); allocates no parameter storage.

    `ckpt` is not changed: the task's `on_load_checkpoint` (which may add defaults for old files) runs on a copy.
    A network that cannot be built on the meta device is left to the real build (its config was still checked).
    """
    try:
        with torch.device("meta"):
            model = cls(config=config, task=task)
    except ZooError as e:
        message = str(e).split(" Change it with --set")[0].rstrip(".")
        raise ZooError(f"{path}: its config is refused: {message}. {REEXPORT}") from None
    except Exception:  # noqa: BLE001 - not buildable on meta (e.g. a constructor reading tensor values)
        return
    probe = {**ckpt, "state_dict": dict(ckpt.get("state_dict") or {})}
    model.on_load_checkpoint(probe)
    state = probe["state_dict"]
    expected = model.state_dict()
    wrong = [(k, _shape(state[k]), tuple(v.shape)) for k, v in expected.items()
             if k in state and _shape(state[k]) != tuple(v.shape)]
    if wrong:
        k, have, want = wrong[0]
        more = f" ({len(wrong)} tensors differ)" if len(wrong) > 1 else ""
        raise ZooError(f"{path}: its config describes a '{task}' network whose tensor {k} has shape {want}, but the "
                       f"file holds shape {have}{more}; nothing was built. {REEXPORT}")
    missing = [k for k in expected if k not in state]
    if missing and model.strict_loading:
        raise ZooError(f"{path}: the file lacks {len(missing)} tensor(s) a '{task}' network built from its config "
                       f"needs (first: {missing[0]}); nothing was built. {REEXPORT}")
