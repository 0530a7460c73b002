"""Synthetic UTKFace: cartoon faces whose age and gender can be learnt from pixels, in UTKFace's file-name format.

Gender: a wide face with short hair (male, 0) or a narrow face with long hair and red lips (female, 1).
Age: hair turns from dark to white between 20 and 80, one more forehead wrinkle every 12 years, getting darker, and
children's faces are smaller. Race (0..4) only changes the skin tone, as a nuisance the model must ignore.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.demo import jitter, smooth_pattern
from zoo.images import save_rgb

SKIN_TONES = ((235, 200, 170), (120, 85, 60), (225, 190, 140), (190, 140, 100), (210, 170, 150))


def sample_age(rng: np.random.Generator) -> int:
    """Ages 1..100, half uniform and half around 30, roughly UTKFace's shape."""
    age = rng.integers(1, 101) if rng.random() < 0.5 else rng.normal(30, 9)
    return int(np.clip(round(float(age)), 1, 100))


def draw_face(age: int, gender: int, race: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One synthetic face, (size, size, 3) uint8."""
    s = size * 4  # draw at 4x and downsample, for smooth edges
    background = (smooth_pattern(rng, s, grid=3) * 0.5 + 0.25) * 255
    im = Image.fromarray(background.astype(np.uint8))
    d = ImageDraw.Draw(im)
    cx, cy = s / 2 + rng.normal(0, s * 0.02), s / 2 + rng.normal(0, s * 0.02)
    scale = 0.72 + 0.28 * min(age, 18) / 18  # children: smaller faces
    half_w = s * scale * (0.30 if gender == 0 else 0.24)
    half_h = s * scale * 0.36
    grey = float(np.clip((age - 20) / 60, 0, 1))
    hair = tuple(int(v) for v in np.array([60, 40, 25]) * (1 - grey) + np.array([235, 235, 235]) * grey)
    if gender == 1:  # long hair behind the face
        d.rectangle([cx - half_w * 1.35, cy - half_h * 1.05, cx + half_w * 1.35, cy + half_h * 0.9], fill=hair)
    skin = tuple(int(np.clip(c + rng.normal(0, 8), 0, 255)) for c in SKIN_TONES[race % len(SKIN_TONES)])
    d.ellipse([cx - half_w, cy - half_h, cx + half_w, cy + half_h], fill=skin)
    d.chord([cx - half_w, cy - half_h * 1.08, cx + half_w, cy - half_h * 0.2], 180, 360, fill=hair)  # hair on top
    eye_y, eye_dx, eye_r = cy - half_h * 0.05, half_w * 0.42, s * 0.025
    for ex in (cx - eye_dx, cx + eye_dx):
        d.ellipse([ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r], fill=(30, 30, 30))
    lips = (200, 40, 60) if gender == 1 else tuple(int(c * 0.7) for c in skin)
    d.rectangle([cx - half_w * 0.35, cy + half_h * 0.45, cx + half_w * 0.35, cy + half_h * 0.55], fill=lips)
    wrinkles, darkness = min(age // 12, 7), min(age / 90, 1.0)
    line = tuple(int(c * (1 - 0.6 * darkness)) for c in skin)
    for i in range(wrinkles):
        y = cy - half_h * 0.25 - i * half_h * 0.06
        d.line([cx - half_w * 0.5, y, cx + half_w * 0.5, y], fill=line, width=max(1, s // 80))
    small = np.asarray(im.resize((size, size), Image.LANCZOS), dtype=np.float32) / 255.0
    return jitter(small, rng, shift=0.04, noise=0.02, brightness=0.06)


def utkface_name(age: int, gender: int, race: int | None, index: int, rng: np.random.Generator) -> str:
    """`[age]_[gender]_[race]_[date&time].jpg.chip.jpg` as in the aligned-and-cropped release (race None: omitted).

    The milliseconds are `index`, so n <= 1000 faces never share a name (a collision would overwrite a file).
    """
    stamp = f"2017{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}{rng.integers(0, 24):02d}" \
            f"{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}{index % 1000:03d}"
    fields = [str(age), str(gender)] + ([str(race)] if race is not None else []) + [stamp]
    return "_".join(fields) + ".jpg.chip.jpg"


def write_demo_utkface(root: Path, n: int = 800, size: int = 64, seed: int = 0) -> None:
    """`n` faces under root/UTKFace/, plus one name without race (kept) and one malformed name (skipped)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "UTKFace"
    for i in range(n):
        age, gender, race = sample_age(rng), int(rng.integers(0, 2)), int(rng.integers(0, 5))
        name = utkface_name(age, gender, race if i else None, i, rng)
        save_rgb(folder / name, draw_face(age, gender, race, rng, size))
    save_rgb(folder / "portrait_unlabelled.jpg.chip.jpg", draw_face(40, 0, 0, rng, size))
