"""LFW-style face identities for metric learning: the people layout or a pre-split layout, P x K batches, pairs.txt.

Layouts (detected automatically; any image format PIL reads, e.g. jpg, png, pgm (ORL), in any letter case):
- people: `<root>/<Person_Name>/<Person_Name>_0001.jpg` (any LFW release: original, funneled, deep-funneled), also
  with one wrapper folder (`<root>/lfw/<Person_Name>/...`). Identities are split by `cfg.split` with `cfg.seed`, never
  sharing a person between splits. `pairs.txt` beside the images (or `cfg.pairs_file`; `none` = off) adds LFW
  verification (pairs naming images that are not there are skipped and counted).
- pre-split: `<root>/{train,val,test}/<person>/<image>` (as upstream FaceRegSMM prepares it); the splits are used as
  given (val or test may be missing: then the other is used for validation).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from datamodules.base import ZooDataModule
from datamodules.demo import jitter, mark_demo, prototypes, smooth_pattern
from datamodules.generated_set import warn_if_incomplete
from datamodules.lfw_pairs import Pair, PairSet, load_pairs
from datamodules.pk_sampler import PKBatchSampler
from datamodules.splits import seeded_split
from zoo.errors import ZooError
from zoo.images import drop_bad_images, is_image, load_rgb, save_rgb

SPLITS = ("train", "val", "test")
MEAN = STD = (0.5, 0.5, 0.5)  # images are scaled to [-1, 1]

LAYOUT_HELP = (
    "an LFW people folder <root>/<Person_Name>/<Person_Name>_0001.jpg (original, funneled or deep-funneled; a single "
    "wrapper folder such as lfw/ or lfw-deepfunneled/ is fine), optionally with pairs.txt, or a pre-split folder "
    "<root>/{train,val,test}/<person>/<image>."
)


# ----- reading the folders -----
def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_people(folder: Path) -> dict[str, list[Path]]:
    """{person: sorted image paths} for every sub-folder of `folder` holding at least one image."""
    people = {}
    for d in _subdirs(folder):
        images = sorted(p for p in d.iterdir() if p.is_file() and is_image(p.name))
        if images:
            people[d.name] = images
    return people


@dataclass
class FaceLayout:
    """What `detect_layout` found: kind ("people" / "split"), the folder holding the person folders (people) or the
    split folders (split), and the pairs.txt next to the images, if any."""

    kind: str
    root: Path
    pairs_file: Path | None = None


def detect_layout(root: Path) -> FaceLayout:
    """The layout of `root` (see the module docstring), looking one wrapper folder deep; ZooError if neither."""
    subdirs = _subdirs(root)
    candidates = [root, subdirs[0]] if len(subdirs) == 1 else [root]  # one wrapper folder such as lfw/
    for candidate in candidates:
        if (candidate / "train").is_dir() and scan_people(candidate / "train"):
            return FaceLayout("split", candidate)
        if scan_people(candidate):
            pairs = next((p / "pairs.txt" for p in (candidate, root, candidate.parent) if (p / "pairs.txt").is_file()),
                         None)
            return FaceLayout("people", candidate, pairs)
    found = ", ".join(p.name + "/" for p in _subdirs(root)[:5]) or "no sub-folders"
    raise ZooError(f"--data-dir {root}: no face images found in the expected layout (found {found}). Expected "
                   f"{LAYOUT_HELP}")


# ----- datasets and transforms -----
def build_transform(image_size: int, augment: str = "none"):
    """albumentations pipeline: uint8 (H, W, 3) -> float tensor (3, S, S) in [-1, 1]. `augment`: none / light / heavy
    (heavy = upstream's list: flip, rotation 15, affine, perspective, resized crop, colour jitter, blur, noise, erasing)."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    s = int(image_size)
    if augment == "none":
        ops = [A.Resize(s, s)]
    elif augment == "light":
        ops = [A.RandomResizedCrop(size=(s, s), scale=(0.8, 1.0), ratio=(0.9, 1.1)), A.HorizontalFlip(),
               A.ColorJitter(0.2, 0.2, 0.2, 0.02, p=0.5)]
    elif augment == "heavy":
        ops = [A.HorizontalFlip(), A.Rotate(limit=15, p=0.5),
               A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), p=0.5), A.Perspective(scale=(0.02, 0.05), p=0.3),
               A.RandomResizedCrop(size=(s, s), scale=(0.7, 1.0)), A.ColorJitter(0.3, 0.3, 0.3, 0.05, p=0.8),
               A.GaussianBlur(blur_limit=(3, 5), p=0.2), A.GaussNoise(std_range=(0.02, 0.08), p=0.2),
               A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.1, 0.3), hole_width_range=(0.1, 0.3), p=0.3)]
    else:
        raise ZooError(f"--set augment={augment}: choose none, light or heavy.")
    return A.Compose([*ops, A.Normalize(mean=MEAN, std=STD), ToTensorV2()])


class FaceImages(Dataset):
    """(path, label) list -> (image (3, S, S) float in [-1, 1], label int)."""

    def __init__(self, items: list[tuple[Path, int]], transform):
        self.items = items
        self.transform = transform

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(image=load_rgb(path))["image"], label


def items_of(people: dict[str, list[Path]]) -> list[tuple[Path, int]]:
    """Flatten {person: images} into (path, label) with labels = index of the sorted person names."""
    return [(p, label) for label, name in enumerate(sorted(people)) for p in people[name]]


# ----- the DataModule -----
class LFWDataModule(ZooDataModule):
    """Face identities for `models.face.FaceEmbedder` (module docstring: layouts).

    Batches: images (B, 3, S, S) in [-1, 1] with S = cfg.image_size, labels (B,) identity indices of that split.
    Training batches are P x K (K = cfg.m_per_class). Validation: the val split and, when a pairs.txt exists, a second
    loader over the unique images of its pairs (labels = image index into `self.pair_images`).
    """

    DEMO_NAME = "lfw"
    LAYOUT_HELP = LAYOUT_HELP

    def __init__(self, cfg: Any, data_dir=None):
        super().__init__(cfg, data_dir)
        self.people: dict[str, dict[str, list[Path]]] = {}
        self.pairs: list[Pair] = []
        self.pair_images: list[Path] = []
        self.pair_set: PairSet | None = None
        self.layout: FaceLayout | None = None

    # ----- demo data -----
    def make_demo(self, root: Path, n_people: int = 40, per_person: int = 8, size: int = 64, seed: int = 0) -> None:
        """Synthetic identities in the LFW layout (one smooth prototype per person + nuisance + jitter), `size` px
        JPEGs, and a pairs.txt of 4 folds x 20 same / 20 different pairs over them."""
        first = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
        last = ["Arden", "Brook", "Casey", "Drake"]
        names = [f"{first[i % 10]}_{last[i // 10 % 4]}" for i in range(n_people)]
        rng = np.random.default_rng(seed)
        # A shared "face" plus a weaker identity pattern, under per-image lighting / background nuisance, so that an
        # untrained network is far from perfect and training has something to learn.
        common = prototypes(1, size, seed + 1, grid=3)[0]
        for name, proto in zip(names, prototypes(n_people, size, seed, grid=4)):
            for i in range(1, per_person + 1):
                nuisance = smooth_pattern(rng, size, grid=3)
                image = 0.45 * common + 0.3 * proto + 0.25 * nuisance
                save_rgb(root / name / f"{name}_{i:04d}.jpg", jitter(image, rng, shift=0.1, noise=0.05, brightness=0.25))
        write_pairs_file(root / "pairs.txt", {n: per_person for n in names}, folds=4, per_fold=20, seed=seed)
        mark_demo(root)

    # ----- setup -----
    def setup(self, stage: str | None = None) -> None:
        if self.people:
            return
        cfg = self.cfg
        self.layout = layout = detect_layout(self.root)
        warn_if_incomplete(self.root, layout.root)  # a set `predict.py generate` did not finish
        k = max(1, int(cfg.min_images_per_person))
        if layout.kind == "split":
            people = {s: scan_people(layout.root / s) if (layout.root / s).is_dir() else {} for s in SPLITS}
            if not people["val"]:
                people["val"] = people["test"]
            self.people = {s: {n: ims for n, ims in p.items() if len(ims) >= k} for s, p in people.items()}
        else:
            everyone = {n: ims for n, ims in scan_people(layout.root).items() if len(ims) >= k}
            split = seeded_split(sorted(everyone), tuple(cfg.split), int(cfg.seed))
            self.people = {s: {n: everyone[n] for n in split[s]} for s in SPLITS}
        self.unreadable = drop_unreadable(self.people, bool(getattr(cfg, "strict_data", False)), str(layout.root))
        self.people = {s: {n: ims for n, ims in p.items() if len(ims) >= k} for s, p in self.people.items()}
        n_train = len(self.people["train"])
        if n_train < 2:
            raise ZooError(f"{layout.root}: only {n_train} training identities with at least {k} images "
                           f"(min_images_per_person). Metric learning needs at least 2; lower "
                           f"--set min_images_per_person or add data. Expected {LAYOUT_HELP}")
        if not self.people["val"]:
            raise ZooError(f"{layout.root}: no validation identities with at least {k} images. Give the split a "
                           f"validation share (--set split=0.7,0.15,0.15) or add a val/ folder.")
        pairs_file = pairs_file_of(getattr(cfg, "pairs_file", "auto"), layout)
        if pairs_file is not None:
            self.pair_set = load_pairs(pairs_file, layout.root, exclude=self.unreadable)
            self.pairs = self.pair_set.pairs
            self.pair_images = self.pair_set.images

    def config_overrides(self) -> dict[str, Any]:
        return {"num_identities": len(self.people["train"])}

    def summary(self) -> str:
        parts = [f"{s} {len(p)} people / {sum(map(len, p.values()))} images" for s, p in self.people.items()]
        if self.pair_set is not None:
            parts.append(self.pair_set.note)
        kind = "demo data" if self.is_demo else f"{self.layout.kind} layout"
        return f"{kind} at {self.layout.root}: " + ", ".join(parts)

    # ----- datasets and loaders -----
    def dataset(self, split: str, train: bool = False) -> FaceImages:
        augment = self.cfg.augment if train else "none"
        return FaceImages(items_of(self.people[split]), build_transform(self.cfg.image_size, augment))

    def pairs_dataset(self) -> FaceImages:
        return FaceImages([(p, i) for i, p in enumerate(self.pair_images)], build_transform(self.cfg.image_size))

    def train_dataloader(self):
        ds = self.dataset("train", train=True)
        sampler = PKBatchSampler(ds.labels, self.cfg.batch_size, self.cfg.m_per_class, seed=int(self.cfg.seed))
        return self.loader(ds, train=True, batch_sampler=sampler)

    def _eval_loaders(self, split: str):
        loaders = [self.loader(self.dataset(split), train=False)]
        if self.pairs:
            loaders.append(self.loader(self.pairs_dataset(), train=False))
        return loaders

    def val_dataloader(self):
        return self._eval_loaders("val")

    def test_dataloader(self):
        if not self.people["test"]:
            raise ZooError("There is no test split (split test fraction 0 and no test/ folder); use --validate.")
        return self._eval_loaders("test")


def pairs_file_of(setting: str | None, layout: FaceLayout) -> Path | None:
    """The pairs file a `pairs_file` setting names: auto = the pairs.txt found beside the images, none (or None) =
    no verification protocol, anything else = that path."""
    if setting is None or str(setting).lower() in ("none", "off", "false", ""):
        return None
    if str(setting).lower() == "auto":
        return layout.pairs_file
    return Path(setting).expanduser()


def drop_unreadable(people: dict[str, dict[str, list[Path]]], strict: bool, where: str) -> set[Path]:
    """Remove the files `zoo.images.probe_image` refuses from every split of `people` (in place; reported, or an
    error when `strict`); returns the removed paths (pairs naming them are skipped)."""
    every = [p for split in people.values() for ims in split.values() for p in ims]
    good = set(drop_bad_images(every, strict, where))
    for split in people.values():
        for name in list(split):
            split[name] = [p for p in split[name] if p in good]
    return set(every) - good


def write_pairs_file(path: Path, counts: dict[str, int], folds: int, per_fold: int, seed: int = 0) -> None:
    """Write a pairs.txt in LFW's format over people with `counts[name]` images each (fixtures and demo data)."""
    rng = np.random.default_rng(seed)
    names = sorted(counts)
    multi = [n for n in names if counts[n] >= 2]
    lines = [f"{folds}\t{per_fold}"]
    for _ in range(folds):
        for _ in range(per_fold):
            n = multi[rng.integers(len(multi))]
            i, j = rng.choice(counts[n], size=2, replace=False) + 1
            lines.append(f"{n}\t{i}\t{j}")
        for _ in range(per_fold):
            a, b = rng.choice(len(names), size=2, replace=False)
            lines.append(f"{names[a]}\t{rng.integers(counts[names[a]]) + 1}\t{names[b]}\t{rng.integers(counts[names[b]]) + 1}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
