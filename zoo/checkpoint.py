"""Reading checkpoints with clear errors, finding a model's latest run, and opening any zoo checkpoint by its task."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load on the CPU; a missing, truncated or foreign file raises a ZooError saying which and what to do."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"Checkpoint not found: {path}. Give the path of a .ckpt file, or `--resume last` for the "
                       f"newest run of the model.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError) as e:
        others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        hint = f" Other checkpoints in that folder: {', '.join(others)}." if others else ""
        raise ZooError(f"Cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}. The file is corrupt or "
                       f"was cut off while saving (e.g. a full disk or a killed process).{hint}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ZooError(f"{path} is not a Lightning checkpoint (no 'state_dict'). Released upstream weights must be "
                       f"converted first: see checkpoints/README.md.")
    return ckpt


def checkpoint_task(ckpt: dict[str, Any], path: str | Path = "") -> str:
    """The registry name of the model a zoo checkpoint holds."""
    task = (ckpt.get("hyper_parameters") or {}).get("task")
    if not task:
        raise ZooError(f"Checkpoint {path} was not written by this zoo (no 'task' in its hyper-parameters). Released "
                       f"upstream weights must be converted first: see checkpoints/README.md.")
    return task


def find_last(model: str, root: Path) -> Path:
    """The newest `last.ckpt` under root/<model>/<run>/."""
    candidates = sorted((root / model).glob("*/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ZooError(f"--resume last: no run of '{model}' has a last.ckpt under {root / model}. Start a run first, "
                       f"or pass the checkpoint's path to --resume.")
    return candidates[-1]


def load_model(path: str | Path, map_location: str | torch.device = "cpu", expected_task: str | None = None):
    """Open any zoo checkpoint with the LightningModule of the task it was written by; returns the model in eval mode."""
    from model_config import get_entry

    ckpt = read_checkpoint(path)
    task = checkpoint_task(ckpt, path)
    if expected_task and task != expected_task:
        raise ZooError(f"{path} holds a '{task}' model, not '{expected_task}'. Use a '{expected_task}' checkpoint, "
                       f"or run the '{task}' commands on it.")
    cls = get_entry(task).load("module")
    model = cls.load_from_checkpoint(str(path), map_location=map_location, weights_only=False)
    return model.eval()
