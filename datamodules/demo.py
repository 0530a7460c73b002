"""Primitives for the built-in demo datasets: smooth random prototypes (one per class or identity) and jitter.

Each task's DataModule writes its demo set in its real on-disk format with these, so the demo exercises the same
reading code as the real dataset. Everything is seeded: the same call writes the same files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DEMO_MARKER = ".zoo-demo"  # written at the root of every demo set: `train.py --data-dir` on it keeps the micro preset


def mark_demo(root: str | Path) -> None:
    """Mark `root` as demo data (see `is_demo_dir`)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / DEMO_MARKER).write_text("built-in demo data of the zoo\n")


def is_demo_dir(root: str | Path | None) -> bool:
    """True for a folder a DataModule's `make_demo` wrote (the preset then follows the demo, not real data)."""
    return root is not None and (Path(root).expanduser() / DEMO_MARKER).is_file()


def smooth_pattern(rng: np.random.Generator, size: int, grid: int = 4) -> np.ndarray:
    """A random smooth colour image, (size, size, 3) float32 in [0, 1]: a grid x grid random field, bicubic-upsampled."""
    coarse = (rng.random((grid, grid, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


def prototypes(n: int, size: int, seed: int, grid: int = 4) -> list[np.ndarray]:
    """`n` distinct smooth patterns (classes or identities)."""
    rng = np.random.default_rng(seed)
    return [smooth_pattern(rng, size, grid) for _ in range(n)]


def jitter(img: np.ndarray, rng: np.random.Generator, shift: float = 0.08, noise: float = 0.04,
           brightness: float = 0.1) -> np.ndarray:
    """One sample of a prototype: random translation, brightness change and pixel noise -> (H, W, 3) uint8."""
    h, w, _ = img.shape
    dy, dx = (rng.integers(-int(shift * h), int(shift * h) + 1, size=2) if shift > 0 else (0, 0))
    out = np.roll(img, (int(dy), int(dx)), axis=(0, 1))
    out = out * (1.0 + rng.uniform(-brightness, brightness)) + rng.normal(0, noise, out.shape)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)
