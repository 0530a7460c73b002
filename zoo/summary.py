"""Parameter counting without allocating weights, cached for `train.py --list`.

Counting builds each preset's model on the meta device, which needs torch and every task's imports (seconds). The
counts are cached in `.zoo_cache/param_counts.json` under a hash of the code that decides them (model_config.py and
every file under models/), so `--list` answers without importing torch until that code changes.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def count_parameters(entry, preset: str) -> int:
    """Parameters of `entry`'s model at `preset`, counted on the meta device (no memory, no init cost).

    Tensors that share storage (tied parameters) are counted once; copies such as an EMA held as a submodule are left
    out by the task's `parameter_count()`.
    """
    import torch

    cfg = entry.config.from_presets(preset)
    cls = entry.load("module")
    with torch.device("meta"):
        model = cls(config=cfg)
    return model.parameter_count()


def code_hash() -> str:
    """sha256 of model_config.py and every .py file under models/ (names and contents)."""
    h = hashlib.sha256()
    for path in [ROOT / "model_config.py", *sorted((ROOT / "models").rglob("*.py"))]:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:20]


def cache_path() -> Path:
    return Path(os.environ.get("ZOO_CACHE_DIR") or ROOT / ".zoo_cache") / "param_counts.json"


def cached_counts(entries) -> dict[str, dict[str, int | str]]:
    """{model: {preset: count, or 'ErrorType' when that preset fails to build}}, from the cache when it is current."""
    key, path = code_hash(), cache_path()
    try:
        cached = json.loads(path.read_text())
        if cached.get("code") == key:
            return cached["counts"]
    except (OSError, ValueError, KeyError):
        pass
    counts: dict[str, dict[str, int | str]] = {}
    for entry in entries:
        counts[entry.name] = {}
        for preset in entry.config.PRESETS:
            try:
                counts[entry.name][preset] = count_parameters(entry, preset)
            except Exception as e:  # noqa: BLE001 - a broken preset must not hide the others
                counts[entry.name][preset] = type(e).__name__
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"code": key, "counts": counts}))
    except OSError:  # a read-only checkout still lists, only slower
        pass
    return counts
