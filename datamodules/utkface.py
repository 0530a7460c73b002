"""UTKFace as published: `[age]_[gender]_[race]_[date&time].jpg(.chip.jpg)` files, read recursively.

    --data-dir /data/utkface      # images directly inside, or in UTKFace/, crop_part1/, part1/ .. part3/

Gender 0 = male, 1 = female; race 0..4 (White, Black, Asian, Indian, Others); ages 1..116. A name that does not parse
is skipped and reported once (count and first examples); a photo present in several sub-folders (crop_part1/ repeats
UTKFace/) is read once, so it cannot land in two splits. The split is seeded, optionally stratified by age decade and
gender; transforms use the backbone's timm data config (input size, mean, std), `cfg.image_size` overriding the size.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import Dataset

from datamodules.base import ZooDataModule
from datamodules.demo import mark_demo
from zoo.errors import ZooError
from zoo.images import drop_bad_images, is_image, load_rgb

log = logging.getLogger(__name__)
NAME_FORMAT = "[age]_[gender]_[race]_[date&time].jpg(.chip.jpg)"


class UTKFaceLabel(NamedTuple):
    """Labels from one file name: age in years, gender 0 male / 1 female, race 0..4 or -1 when the name has none."""

    age: int
    gender: int
    race: int


def parse_utkface_name(name: str) -> UTKFaceLabel | None:
    """Labels of a UTKFace file name, or None when it does not parse.

    As the published set is read upstream: the name (without `.jpg` / `.jpg.chip.jpg`) splits on `_` into at least
    three fields, the first an age, the second 0 or 1; the race field is missing from a few published names (then -1).
    """
    stem = Path(name).name
    for suffix in (".chip.jpg", ".jpg", ".jpeg", ".png"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    parts = stem.split("_")
    if len(parts) < 3 or not parts[0].isdigit() or parts[1] not in ("0", "1"):
        return None
    race = int(parts[2]) if len(parts) >= 4 and parts[2] in ("0", "1", "2", "3", "4") else -1
    return UTKFaceLabel(int(parts[0]), int(parts[1]), race)


@dataclass
class UTKFaceScan:
    """What a dataset root holds: readable samples (sorted by path), skipped names and repeated photos."""

    paths: list[Path]
    labels: list[UTKFaceLabel]
    skipped: list[str]  # relative paths of images whose name does not parse or whose age is out of range
    duplicates: int  # photos found in more than one sub-folder, read once

    def report(self) -> str:
        """One line about what was left out, or '' when nothing was."""
        notes = []
        if self.skipped:
            examples = ", ".join(self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
            notes.append(f"skipped {len(self.skipped)} image(s) whose name is not {NAME_FORMAT} with an age in "
                         f"range: {examples}")
        if self.duplicates:
            notes.append(f"read {self.duplicates} photo(s) found in several sub-folders once")
        return "UTKFace: " + "; ".join(notes) if notes else ""


def scan_utkface(root: str | Path, max_age: float = 116.0) -> UTKFaceScan:
    """All images under `root` (recursively), labelled from their names; aligned crops (.chip.jpg) win over duplicates."""
    root = Path(root)
    chosen: dict[str, tuple[Path, UTKFaceLabel]] = {}
    skipped, duplicates = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_image(p.name)):
        label = parse_utkface_name(path.name)
        if label is None or not 1 <= label.age <= max_age:
            skipped.append(str(path.relative_to(root)))
            continue
        key = path.name.lower().removesuffix(".chip.jpg").removesuffix(".jpg")
        if key in chosen:
            duplicates += 1
            if chosen[key][0].name.lower().endswith(".chip.jpg") or not path.name.lower().endswith(".chip.jpg"):
                continue
        chosen[key] = (path, label)
    items = sorted(chosen.values())
    return UTKFaceScan([p for p, _ in items], [lab for _, lab in items], skipped, duplicates)


def strata_of(ages: np.ndarray, genders: np.ndarray) -> np.ndarray:
    """Stratum per sample: age decade (90+ together) x gender."""
    return np.minimum(np.asarray(ages) // 10, 9) * 2 + np.asarray(genders)


def _merge_rare(strata: np.ndarray, min_count: int) -> np.ndarray:
    """Strata with fewer than `min_count` members pooled into one; a pool still too small joins the largest stratum."""
    strata = strata.copy()
    counts = Counter(strata.tolist())
    rare = [s for s, c in counts.items() if c < min_count]
    if rare:
        strata[np.isin(strata, rare)] = -1
        if (strata == -1).sum() < min_count:
            strata[strata == -1] = counts.most_common(1)[0][0]
    return strata


def _two_way(index: np.ndarray, strata: np.ndarray | None, second: float, seed: int):
    """Seeded split of `index` into (first, second) with a `second` fraction, stratified when `strata` is given."""
    from sklearn.model_selection import train_test_split

    n_second = max(1, round(second * len(index)))
    if strata is not None:
        minority = min(n_second, len(index) - n_second)
        merged = _merge_rare(strata, min_count=max(2, math.ceil(2 * len(index) / max(1, minority))))
        try:
            return train_test_split(index, test_size=n_second, random_state=seed, stratify=merged)
        except ValueError as e:  # too few samples per stratum even after pooling
            log.warning("UTKFace: stratified split impossible (%s); splitting at random instead.", e)
    return train_test_split(index, test_size=n_second, random_state=seed)


def split_indices(ages, genders, fractions: tuple[float, float, float], seed: int,
                  stratify: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (train, val, test) index arrays: seeded, disjoint, covering every sample; a 0 test fraction -> empty test.

    With `stratify` each split keeps the age-decade x gender proportions (scikit-learn), rare strata pooled.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or fractions[0] <= 0 or fractions[1] <= 0:
        raise ZooError(f"split={fractions}: give three train,val,test fractions, train and val > 0 "
                       f"(e.g. --set split=0.8,0.1,0.1).")
    n = len(ages)
    if n < 3:
        raise ZooError(f"UTKFace: only {n} labelled image(s); at least 3 are needed for train/val/test splits.")
    total = sum(fractions)
    train_f, val_f, test_f = (f / total for f in fractions)
    strata = strata_of(ages, genders) if stratify else None
    index = np.arange(n)
    train, rest = _two_way(index, strata, val_f + test_f, seed)
    if test_f > 0:
        val, test = _two_way(np.asarray(rest), strata[rest] if strata is not None else None,
                             test_f / (val_f + test_f), seed + 1)
    else:
        val, test = rest, np.array([], dtype=int)
    return tuple(np.sort(np.asarray(s, dtype=int)) for s in (train, val, test))


def build_transform(data_config: dict[str, Any], train: bool):
    """albumentations pipeline -> {"image": (3, H, W) float32 tensor, normalised with the backbone's mean / std}.

    Training: resize, rotate +-20 degrees, horizontal flip, brightness / contrast +-0.2 (the published recipe).
    """
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    _, h, w = data_config["input_size"]
    interpolation = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}.get(
        data_config.get("interpolation", "bicubic"), cv2.INTER_CUBIC)
    steps = [A.Resize(h, w, interpolation=interpolation)]
    if train:
        steps += [A.Rotate(limit=20, border_mode=cv2.BORDER_REFLECT_101, p=0.5), A.HorizontalFlip(p=0.5),
                  A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5)]
    steps += [A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(steps)


def data_config_for(cfg: Any) -> dict[str, Any]:
    """The backbone's timm data config with `cfg.image_size` (when set) as the input size."""
    from models.backbones import backbone_data_config

    return backbone_data_config(cfg.backbone, cfg.image_size)


class UTKFaceDataset(Dataset):
    """Items: {"image": (3, H, W) float32, "age": () float32 years, "gender": () float32 (1 = female)}."""

    def __init__(self, paths: list[Path], labels: list[UTKFaceLabel], transform):
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        label = self.labels[i]
        image = self.transform(image=load_rgb(self.paths[i]))["image"]
        return {"image": image, "age": torch.tensor(float(label.age)), "gender": torch.tensor(float(label.gender))}


class UTKFaceDataModule(ZooDataModule):
    """UTKFace (or the built-in synthetic faces) split into train / val / test with `cfg.split` and `cfg.seed`."""

    DEMO_NAME = "utkface"
    DEMO_SIZE = 800  # synthetic faces (64 px) in the demo set
    LAYOUT_HELP = (f"UTKFace images named {NAME_FORMAT}, directly in the folder or in sub-folders such as UTKFace/, "
                   f"crop_part1/, part1/..part3/ (searched recursively).")

    def make_demo(self, root: Path) -> None:
        from datamodules.utkface_demo import write_demo_utkface

        write_demo_utkface(root, n=self.DEMO_SIZE)
        mark_demo(root)

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "scan", None) is not None:
            return
        scan = scan_utkface(self.root, self.cfg.max_age)
        if scan.report():
            _warn_once(scan.report())
        good = set(drop_bad_images(scan.paths, bool(getattr(self.cfg, "strict_data", False)), f"UTKFace {self.root}"))
        if len(good) < len(scan.paths):
            kept = [(p, lab) for p, lab in zip(scan.paths, scan.labels) if p in good]
            scan = UTKFaceScan([p for p, _ in kept], [lab for _, lab in kept], scan.skipped, scan.duplicates)
        if len(scan.paths) < 3:
            raise ZooError(f"Found {len(scan.paths)} usable image(s) under {self.root}. Expected: {self.LAYOUT_HELP}")
        ages = np.array([lab.age for lab in scan.labels])
        genders = np.array([lab.gender for lab in scan.labels])
        self.splits = dict(zip(("train", "val", "test"),
                               split_indices(ages, genders, self.cfg.split, self.cfg.seed, self.cfg.stratify)))
        data = data_config_for(self.cfg)
        transforms = {"train": build_transform(data, train=True), "val": build_transform(data, train=False),
                      "test": build_transform(data, train=False)}
        self.datasets = {name: UTKFaceDataset([scan.paths[i] for i in idx], [scan.labels[i] for i in idx],
                                              transforms[name]) for name, idx in self.splits.items()}
        self.scan = scan
        _print_once(self.baseline_line())

    def summary(self) -> str:
        """One line about the data found, for the first line of a run."""
        kind = "demo data" if self.is_demo else "UTKFace"
        sizes = " / ".join(f"{len(idx)} {name}" for name, idx in self.splits.items())
        return f"{kind} at {self.root}: {len(self.scan.paths)} labelled images ({sizes})"

    def baseline_line(self) -> str:
        """The trivial predictor's scores on val and test, printed beside the model's metrics."""
        parts = []
        for split in ("val", "test"):
            if len(self.splits[split]):
                b = self.baseline(split)
                parts.append(f"{split} age MAE {b['age_mae']:.2f} years, gender acc {b['gender_acc']:.3f}")
        return "[utkface] trivial predictor (train median age, majority gender): " + "; ".join(parts)

    def baseline(self, split: str = "val") -> dict[str, float]:
        """Scores of a model that ignores the image (train median age, majority gender) on `split`."""
        train = [self.scan.labels[i] for i in self.splits["train"]]
        other = [self.scan.labels[i] for i in self.splits[split]]
        median = float(np.median([lab.age for lab in train]))
        majority = int(np.mean([lab.gender for lab in train]) >= 0.5)
        return {"age_mae": float(np.mean([abs(lab.age - median) for lab in other])),
                "gender_acc": float(np.mean([lab.gender == majority for lab in other]))}

    def train_dataloader(self):
        return self.loader(self.datasets["train"], train=True)

    def val_dataloader(self):
        return self.loader(self.datasets["val"], train=False)

    def test_dataloader(self):
        if not len(self.datasets["test"]):
            raise ZooError(f"split={tuple(self.cfg.split)} has no test fraction: set e.g. --set split=0.8,0.1,0.1.")
        return self.loader(self.datasets["test"], train=False)


@rank_zero_only
def _print_once(message: str) -> None:
    print(message)


@rank_zero_only
def _warn_once(message: str) -> None:
    log.warning(message)
