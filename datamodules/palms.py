"""Palm and hand photos for the diffusion generator: any folder, searched recursively, with or without one sub-folder
per person.

Layout: `<root>/**/<image>` with jpg / jpeg / png / bmp / tif / tiff (any letter case; every format PIL reads).
When images sit in sub-folders, the first-level sub-folder is the person (`<root>/<person>/**/<image>`): that identity
label is kept for the identity metrics and for training a recogniser on the same folder. Images directly in `<root>`
are one identity each. A generated set that is incomplete (its .generation.json says so) is named in a warning.
Unreadable files (empty, truncated, not an image) and files that are not images are reported
(count and the first names) and skipped before training starts; an empty folder is a ZooError.

Images are resized (shorter side) and center-cropped to `cfg.image_size`, RGB, float in [0, 1] (the diffusion
normalises to [-1, 1] itself); training adds a horizontal flip with `cfg.hflip`. The split is per image, seeded; a
folder too small to fill the validation and test shares (fewer than 3 images) is an error before training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset

from datamodules.base import ZooDataModule
from datamodules.generated_set import warn_if_incomplete
from datamodules.splits import seeded_split
from zoo.errors import ZooError
from zoo.images import find_bad_images, is_image, load_rgb

LAYOUT_HELP = ("a folder of palm or hand photos, searched recursively (jpg, jpeg, png, bmp, tif, tiff in any letter "
               "case), optionally one sub-folder per person: <root>/<person>/<image>.")
EXAMPLES = 3  # file names shown per kind of skipped file


# ----- reading the folder -----
@dataclass
class PalmScan:
    """What `scan_palms` found: readable images with their identity names, and the files it skipped, by kind
    ("unreadable": empty / truncated / not an image; "not_image": files without an image extension)."""

    items: list[tuple[Path, str]]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def identities(self) -> list[str]:
        return sorted({person for _, person in self.items})

    def skipped_counts(self) -> dict[str, Any]:
        out: dict[str, Any] = {kind: len(names) for kind, names in self.skipped.items()}
        out["examples"] = [n for names in self.skipped.values() for n in names[:EXAMPLES]]
        return out

    def report(self, root: Path) -> str:
        """One line naming what was skipped, or '' when nothing was."""
        parts = [f"{len(names)} {kind.replace('_', ' ')} ({', '.join(names[:EXAMPLES])}{', ...' if len(names) > EXAMPLES else ''})"
                 for kind, names in self.skipped.items() if names]
        return f"[palms] {root}: skipped {', '.join(parts)}" if parts else ""


def person_of(path: Path, root: Path) -> str:
    """The identity of an image: its first-level sub-folder under root, else the file's own stem."""
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def scan_palms(root: str | Path) -> PalmScan:
    """Every readable image under `root` (sorted), its identity, and the skipped files; hidden files are ignored."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    images = [p for p in files if is_image(p.name)]
    others = [p for p in files if not is_image(p.name)]
    bad = find_bad_images(images)
    refused = {b.path for b in bad}
    unreadable = [f"{b.path.relative_to(root)} ({b.reason})" for b in bad]
    items = [(p, person_of(p, root)) for p in images if p not in refused]
    return PalmScan(items, {"unreadable": unreadable, "not_image": [str(p.relative_to(root)) for p in others]})


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: shorter side to `size` (bicubic, antialiased), then a center crop."""
    im = Image.fromarray(image)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


class PalmImages(Dataset):
    """(path, identity index) items -> (image (3, S, S) float32 in [0, 1], identity int).

    A file that fails to decode mid-epoch (changed on disk after the check) is replaced by the next readable item,
    with one warning, rather than ending the run.
    """

    def __init__(self, items: list[tuple[Path, int]], size: int, hflip: bool = False, seed: int = 0):
        self.items, self.size, self.hflip, self.seed = items, int(size), hflip, seed
        self._warned = False

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> np.ndarray:
        return resize_center_crop(load_rgb(self.items[i][0]), self.size)

    def __getitem__(self, i: int):
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            try:
                image = self.image(j)
                break
            except ZooError as e:
                if not self._warned:
                    print(f"[palms] warning: {e} (skipped; using the next image)")
                    self._warned = True
        else:
            raise ZooError("[palms] no image of this split can be read any more; check the data folder.")
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255.0)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.items[j][1]


# ----- demo palms -----
def _bezier(p0, p1, p2, n: int = 24) -> list[tuple[float, float]]:
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t ** 2 * np.array(p2)
    return [tuple(map(float, p)) for p in pts]


def draw_palm(identity: dict, size: int, rng: np.random.Generator, variation: float = 1.0) -> np.ndarray:
    """One photo of a synthetic palm: a skin-coloured palm and four fingers with the identity's three principal lines
    (quadratic Bezier creases, as BezierPalm draws identities), under a random pose, light and background."""
    s = 4 * size  # drawn large, then downsampled: smooth edges
    im = Image.new("RGB", (s, s), tuple(int(c) for c in rng.integers(20, 90, 3)))
    d = ImageDraw.Draw(im)
    skin = np.array(identity["skin"])
    cx, cy, r = s * 0.5, s * 0.6, s * identity["width"]
    d.ellipse([cx - r, cy - r * 1.1, cx + r, cy + r * 1.1], fill=tuple(int(c) for c in skin))
    for k, length in enumerate(identity["fingers"]):
        fx = cx - r * 0.75 + k * r * 0.5
        d.rounded_rectangle([fx - r * 0.2, cy - r * 1.0 - length * s, fx + r * 0.2, cy - r * 0.6],
                            radius=int(r * 0.2), fill=tuple(int(c) for c in skin * 0.97))
    crease = tuple(int(c) for c in skin * 0.55)
    for line in identity["lines"]:
        pts = [(cx + (x - 0.5) * 2 * r, cy + (y - 0.5) * 2 * r) for x, y in line]
        d.line(_bezier(*pts), fill=crease, width=max(2, s // 40))
    angle = rng.uniform(-10, 10) * variation
    im = im.rotate(angle, resample=Image.BICUBIC, translate=tuple(rng.integers(-s // 20, s // 20 + 1, 2) * variation))
    im = im.filter(ImageFilter.GaussianBlur(radius=s / 160)).resize((size, size), Image.LANCZOS)
    x = np.asarray(im, dtype=np.float32) * (1 + rng.uniform(-0.15, 0.15) * variation)
    x = x + rng.normal(0, 4.0, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def demo_identity(rng: np.random.Generator) -> dict:
    """Random identity parameters for `draw_palm`: skin tone, palm width, finger lengths, three crease curves."""
    heart = [(0.05, rng.uniform(0.2, 0.35)), (0.5, rng.uniform(0.05, 0.35)), (0.95, rng.uniform(0.15, 0.35))]
    head = [(0.05, rng.uniform(0.35, 0.55)), (0.5, rng.uniform(0.3, 0.6)), (0.9, rng.uniform(0.45, 0.7))]
    life = [(0.3, rng.uniform(0.25, 0.4)), (rng.uniform(0.2, 0.5), 0.65), (0.5, rng.uniform(0.9, 1.0))]
    return {"skin": rng.uniform([150, 100, 80], [240, 190, 160]), "width": rng.uniform(0.22, 0.3),
            "fingers": rng.uniform(0.08, 0.16, 4), "lines": [heart, head, life]}


# ----- the DataModule -----
class PalmDataModule(ZooDataModule):
    """Palm photos for `models.palm.PalmDiffusion` (module docstring: layout, skipping, preprocessing).

    Batches: images (B, 3, S, S) float32 in [0, 1] with S = cfg.image_size, identities (B,) int (index into
    `self.identities`). `describe()` gives the split sizes, the number of identities and what was skipped.
    """

    DEMO_NAME = "palms"
    LAYOUT_HELP = LAYOUT_HELP

    def __init__(self, cfg: Any, data_dir=None):
        super().__init__(cfg, data_dir)
        self.scan: PalmScan | None = None
        self.identities: list[str] = []
        self.splits: dict[str, list[tuple[Path, int]]] = {}

    def make_demo(self, root: Path, n_people: int = 8, per_person: int = 12, size: int = 64, seed: int = 0) -> None:
        """`n_people` synthetic palm identities x `per_person` photos, `size` px JPEGs in <root>/<person>/<k>.jpg."""
        rng = np.random.default_rng(seed)
        for i in range(n_people):
            identity = demo_identity(rng)
            person = root / f"person_{i:03d}"
            person.mkdir(parents=True, exist_ok=True)
            for k in range(per_person):
                Image.fromarray(draw_palm(identity, size, rng)).save(person / f"{k:02d}.jpg", quality=95)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        root = self.root
        warn_if_incomplete(root)
        scan = scan_palms(root)
        if not scan.items:
            found = sum(len(v) for v in scan.skipped.values())
            raise ZooError(f"--data-dir {root}: no readable image found ({found} other or unreadable file(s)). "
                           f"Expected {LAYOUT_HELP}")
        report = scan.report(root)
        if report:
            if getattr(self.cfg, "strict_data", False):
                raise ZooError(f"{report}. Delete or replace them, or drop --set strict_data=true to skip them.")
            print(f"{report}. Skipped; --set strict_data=true makes this an error.")
        self.scan = scan
        self.identities = scan.identities
        index = {name: i for i, name in enumerate(self.identities)}
        items = [(p, index[person]) for p, person in scan.items]
        parts = seeded_split(range(len(items)), tuple(self.cfg.split), int(self.cfg.seed))
        empty = [name for name, f in zip(("val", "test"), tuple(self.cfg.split)[1:]) if f > 0 and not parts[name]]
        if empty:  # no val/loss, hence no best-*.ckpt: said before training rather than by Lightning's warnings
            raise ZooError(f"--data-dir {root}: {len(items)} readable image(s) leave the {' and '.join(empty)} share{'s' * (len(empty) > 1)} "
                           f"of split={','.join(f'{f:g}' for f in self.cfg.split)} empty; holding one image out for "
                           f"validation (val/loss picks best-*.ckpt) and one for test needs at least 3. Add images, or "
                           f"train on all of them without validation (last.ckpt only): --set split=1,0,0.")
        self.splits = {name: [items[i] for i in idx] for name, idx in parts.items()}

    def describe(self) -> dict[str, Any]:
        """{"train": n, "val": n, "test": n, "identities": n, "skipped": {"unreadable": n, "not_image": n,
        "examples": [first names]}} (after `setup`)."""
        if not self.splits:
            self.setup("fit")
        return {**{k: len(v) for k, v in self.splits.items()}, "identities": len(self.identities),
                "skipped": self.scan.skipped_counts()}

    def dataset(self, split: str) -> PalmImages:
        if not self.splits:
            self.setup("fit")
        return PalmImages(self.splits[split], self.cfg.image_size, hflip=split == "train" and self.cfg.hflip)

    def train_dataloader(self):
        ds = self.dataset("train")
        if len(ds) < self.cfg.batch_size:
            raise ZooError(f"{self.root}: {len(ds)} training image(s), fewer than one batch (--batch-size "
                           f"{self.cfg.batch_size}). Give more images or a smaller --batch-size.")
        return self.loader(ds, train=True)

    def val_dataloader(self):
        ds = self.dataset("val")
        return self.loader(ds, train=False) if len(ds) else []

    def test_dataloader(self):
        return self.loader(self.dataset("test"), train=False)

