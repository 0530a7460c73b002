"""Built-in demo data for the hand task, in the exact 11k Hands format: HandInfo.csv (CRLF, quoted zero-padded ids,
the nine columns) and JPEGs in Hands/.

Each synthetic subject is a hand silhouette (palm + five fingers, its own finger lengths, skin tone and a mark
pattern: stripes / dots / ring count) on a white background; dorsal images carry nails, palmar ones crease lines,
left hands are mirrored. Images differ by a small shift, scale, brightness change and noise. A few rows have
accessories (a dark band), which the protocol drops. Seeded: the same call writes the same files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

AGES = (18, 20, 21, 22, 23, 26, 35, 50)
SKINS = ("fair", "medium", "dark", "very fair")


def _hand(rng: np.random.Generator, subject: dict, aspect: str, accessory: bool, w: int, h: int) -> np.ndarray:
    scale = 0.85 + 0.15 * rng.random()
    im = Image.new("RGB", (w * 2, h * 2), (255, 255, 255))  # drawn at 2x, downsampled: smooth edges
    d = ImageDraw.Draw(im)
    cx, cy = w * (1.0 + rng.uniform(-0.08, 0.08)), h * (1.35 + rng.uniform(-0.05, 0.05))
    pw, ph = 0.85 * w * scale, 0.8 * h * scale
    skin = subject["skin"]
    d.ellipse([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2], fill=skin)
    finger_w = pw / 5.5
    for k, length in enumerate(subject["fingers"]):
        x = cx - pw / 2 + finger_w * (0.4 + 1.05 * k) if k < 4 else cx + pw / 2 - finger_w * 0.2
        top = cy - ph / 2 - length * h * scale
        if k == 4:  # thumb, to the side
            d.rounded_rectangle([x, cy - ph * 0.3, x + length * h * scale, cy - ph * 0.3 + finger_w], finger_w / 2,
                                fill=skin)
            continue
        d.rounded_rectangle([x, top, x + finger_w, cy - ph / 4], finger_w / 2, fill=skin)
        if aspect.startswith("dorsal"):
            d.ellipse([x + finger_w * 0.2, top + 2, x + finger_w * 0.8, top + finger_w * 0.9], fill=subject["nail"])
    mark = subject["mark"]
    for j in range(subject["n_marks"]):  # the subject's own pattern on the palm / back
        t = (j + 1) / (subject["n_marks"] + 1)
        if subject["kind"] == 0:
            d.line([cx - pw * 0.35, cy - ph * 0.3 + t * ph * 0.6, cx + pw * 0.35, cy - ph * 0.3 + t * ph * 0.6],
                   fill=mark, width=7)
        elif subject["kind"] == 1:
            d.ellipse([cx - pw * 0.4 + t * pw * 0.8 - 9, cy - 9, cx - pw * 0.4 + t * pw * 0.8 + 9, cy + 9], fill=mark)
        else:
            d.line([cx - pw * 0.4 + t * pw * 0.8, cy - ph * 0.35, cx - pw * 0.4 + t * pw * 0.8, cy + ph * 0.35],
                   fill=mark, width=7)
    if aspect.startswith("palmar"):
        d.arc([cx - pw * 0.4, cy - ph * 0.2, cx + pw * 0.3, cy + ph * 0.4], 200, 340, fill=(120, 70, 60), width=2)
    if accessory:
        d.rectangle([cx - pw / 2, cy - ph / 2 - 6, cx - pw / 2 + 2 * finger_w, cy - ph / 2], fill=(30, 30, 30))
    if aspect.endswith("left"):
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(im.resize((w, h), Image.BILINEAR), dtype=np.float32)
    arr = arr * (1 + rng.uniform(-0.08, 0.08)) + rng.normal(0, 3, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def write_demo_hands(root: Path, columns: tuple[str, ...], aspects: tuple[str, ...], n_subjects: int = 16,
                     per_aspect: int = 5, accessory_rows: int = 6, size: tuple[int, int] = (80, 60), seed: int = 0,
                     ) -> None:
    """Write `n_subjects` x 4 aspects x `per_aspect` images (+ `accessory_rows` with accessories) under `root`.

    columns, aspects: the CSV's column names and the four aspect names (`datamodules.hands11k.COLUMNS`, `ASPECTS`;
    given by the caller, so that this module does not import the data module that imports it)."""
    rng = np.random.default_rng(seed)
    (root / "Hands").mkdir(parents=True, exist_ok=True)
    lines = [",".join(columns)]
    n = 0
    for s in range(n_subjects):
        sid = f"{s * 7:07d}"  # zero-padded and not contiguous, as in the real CSV
        tone = rng.uniform(0.45, 0.9)
        tint = rng.uniform(-40, 40, 3)  # identity cue that survives down-sampling to 32 px
        subject = {
            "skin": tuple(int(np.clip(c + t, 0, 235)) for c, t in zip((240 * tone + 15, 190 * tone, 160 * tone), tint)),
            "nail": tuple(int(c) for c in rng.integers(150, 255, 3)),
            "mark": tuple(int(c) for c in rng.integers(0, 200, 3)),
            "kind": s % 3, "n_marks": 1 + (s // 3) % 4,
            "fingers": rng.uniform(0.3, 0.6, 5),
        }
        age, gender, skin = AGES[s % len(AGES)], ("male", "female")[s % 2], SKINS[s % len(SKINS)]
        for aspect in aspects:
            extra = 1 if s < accessory_rows and aspect == aspects[s % 4] else 0
            for k in range(per_aspect + extra):
                accessory = k == per_aspect
                n += 1
                name = f"Hand_{n:07d}.jpg"
                Image.fromarray(_hand(rng, subject, aspect, accessory, *size)).save(root / "Hands" / name, quality=92)
                lines.append(f'"{sid}",{age},"{gender}","{skin}",{int(accessory)},0,"{aspect}","{name}",0')
    (root / "HandInfo.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
