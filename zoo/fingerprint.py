"""What identifies a model's outputs: a SHA-256 over its task, its config and every tensor of its state_dict.

Files a model writes that only that model can read correctly (galleries of enrolled embeddings) record it, so another
model (another checkpoint of the same task, another config) is refused instead of answering silently wrong. A
checkpoint and its `.safetensors` export hold the same task, config and tensors, so they share the fingerprint; any
change of a weight, a buffer (e.g. the calibrated threshold) or a config field changes it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def model_fingerprint(model: Any) -> str:
    """Hex SHA-256 of `model.TASK`, `model.cfg.to_dict()` (JSON, sorted keys) and each state_dict tensor (name,
    dtype, shape, raw bytes) in name order."""
    h = hashlib.sha256()
    h.update(f"task={getattr(model, 'TASK', '')}\n".encode())
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode() + b"\n")
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def short(fingerprint: str) -> str:
    """The first 12 hex digits, as messages show a fingerprint."""
    return fingerprint[:12]
