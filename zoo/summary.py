"""Parameter counting without allocating weights (for `train.py --list`)."""
from __future__ import annotations

import torch


def count_parameters(entry, preset: str) -> int:
    """Parameters of `entry`'s model at `preset`, counted on the meta device (no memory, no init cost).

    Tensors that share storage (tied parameters) are counted once.
    """
    cfg = entry.config.from_presets(preset)
    cls = entry.load("module")
    with torch.device("meta"):
        model = cls(config=cfg)
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already yields each Parameter object once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
