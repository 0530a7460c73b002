"""11k Hands as published: `HandInfo.csv` (nine columns, quoted zero-padded ids) and the images in one folder.

    --data-dir /data/11k            # holds HandInfo.csv and Hands/ (or images/, or the images themselves)
    --data-dir /data/11k/Hands      # the image folder, HandInfo.csv beside it or one level up

Protocols (`cfg.protocol`):
- closed_set (upstream's): rows with accessories dropped; for each aspect (palmar right, palmar left, dorsal right,
  dorsal left) a subject-stratified split (`val_fraction` 0.2, `split_seed` 42, scikit-learn `train_test_split` on the
  aspect's rows in CSV order: the same rows as upstream's pandas code); train = the four train parts, val = the four
  val parts; identity and gender encoders fitted on train. There is no test split (upstream evaluates on val).
- open_set (hand re-identification): the subjects are split once into two disjoint halves (`split_seed`); the
  training half is trained on (minus `open_val_identities` of its subjects, held out for validation and threshold
  calibration), the other half is the test set, evaluated per aspect with one random gallery image per subject and the
  rest as queries (rank-1, rank-5, mAP averaged over `gallery_draws` seeded draws).

The 1600x1200 originals are decoded once: `prepare_data` writes a copy resized to image_size x image_size (aspect not
kept, as upstream's Resize) under the cache folder, keyed by the size and the source files (name, size, mtime), and
training reads that. The silhouette target is the non-white part of the image (uniform white background).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.base import REPO_ROOT, ZooDataModule
from zoo.errors import ZooError
from zoo.images import drop_bad_images, is_image, load_rgb, save_rgb

CSV_NAME = "HandInfo.csv"
COLUMNS = ("id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand", "imageName",
           "irregularities")
ASPECTS = ("palmar right", "palmar left", "dorsal right", "dorsal left")
IMAGE_FOLDERS = ("Hands", "hands", "images", "Images")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as upstream
LAYOUT_HELP = (f"the 11k Hands layout: {CSV_NAME} (columns {', '.join(COLUMNS)}) and the images in Hands/ beside it "
               f"(or images/, or the CSV's own folder); --data-dir may be the CSV's folder or the image folder.")


# ----------------------------------------------------------------------------------------------------------------------
# Reading HandInfo.csv
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HandRecord:
    """One row of HandInfo.csv. `row` is the 1-based line number in the file (header = line 1)."""

    id: str  # zero-padded subject id, as written
    age: int
    gender: str
    skin: str
    accessories: int
    nail_polish: int
    aspect: str
    image: str
    irregularities: int
    row: int


def _examples(rows: list[tuple[int, str]], n: int = 3) -> str:
    return ", ".join(f"line {r} ({v!r})" for r, v in rows[:n]) + (f" and {len(rows) - n} more" if len(rows) > n else "")


def read_hand_info(path: str | Path) -> list[HandRecord]:
    """All rows of a HandInfo.csv (CRLF or LF, quoted or bare fields), validated; ZooError naming the file, the
    offending lines (count and the first few) and the fix for: missing/renamed columns, unknown aspects, unparsable
    ages or flags."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            extra = [h for h in header if h not in COLUMNS]
            raise ZooError(f"{path}: missing column(s) {', '.join(missing)}"
                           f"{' (found instead: ' + ', '.join(extra) + ')' if extra else ''}. The 11k Hands CSV has "
                           f"the columns {', '.join(COLUMNS)}; restore the published header.")
        where = {c: header.index(c) for c in COLUMNS}
        rows = [(i, r) for i, r in enumerate(reader, start=2) if any(cell.strip() for cell in r)]
    bad: dict[str, list[tuple[int, str]]] = {"aspect": [], "age": [], "flag": [], "short": []}
    records = []
    for line, r in rows:
        if len(r) < len(header):
            bad["short"].append((line, ",".join(r)))
            continue
        get = {c: r[j].strip() for c, j in where.items()}
        aspect = get["aspectOfHand"].lower()
        if aspect not in ASPECTS:
            bad["aspect"].append((line, get["aspectOfHand"]))
        try:
            age = int(float(get["age"]))
        except ValueError:
            bad["age"].append((line, get["age"]))
            age = -1
        try:
            flags = [int(float(get[c] or 0)) for c in ("accessories", "nailPolish", "irregularities")]
        except ValueError:
            bad["flag"].append((line, f"{get['accessories']},{get['nailPolish']},{get['irregularities']}"))
            flags = [0, 0, 0]
        records.append(HandRecord(get["id"], age, get["gender"].lower(), get["skinColor"], flags[0], flags[1], aspect,
                                  get["imageName"], flags[2], line))
    if bad["short"]:
        raise ZooError(f"{path}: {len(bad['short'])} row(s) have fewer than {len(header)} fields: "
                       f"{_examples(bad['short'])}. Repair or delete those lines.")
    if bad["aspect"]:
        raise ZooError(f"{path}: {len(bad['aspect'])} row(s) have an unknown aspectOfHand: {_examples(bad['aspect'])}. "
                       f"Expected one of {', '.join(ASPECTS)}; fix those rows or delete them.")
    if bad["age"]:
        raise ZooError(f"{path}: {len(bad['age'])} row(s) have an age that is not a number: {_examples(bad['age'])}. "
                       f"Give ages in years (e.g. 27) or delete those rows.")
    if bad["flag"]:
        raise ZooError(f"{path}: {len(bad['flag'])} row(s) have accessories/nailPolish/irregularities that are not 0/1: "
                       f"{_examples(bad['flag'])}. Fix those rows or delete them.")
    first: dict[str, int] = {}
    twice = []  # one image under two rows would be two subjects, or land in train and validation at once
    for r in records:
        if r.image in first:
            twice.append((first[r.image], r.row, r.image))
        first.setdefault(r.image, r.row)
    if twice:
        a, b, name = twice[0]
        more = f" ({len(twice)} duplicated rows in all)" if len(twice) > 1 else ""
        raise ZooError(f"{path}: imageName {name!r} appears on line {a} and line {b}{more}; each image belongs to one "
                       f"row. Delete the wrong row(s).")
    return records


def find_layout(data_dir: str | Path) -> tuple[Path, Path]:
    """(HandInfo.csv, image folder) for a data dir that is the CSV's folder or the image folder."""
    root = Path(data_dir)
    csv_path = next((p / CSV_NAME for p in (root, root.parent) if (p / CSV_NAME).is_file()), None)
    if csv_path is None:
        raise ZooError(f"--data-dir {root}: no {CSV_NAME} in it or its parent folder. Expected {LAYOUT_HELP}")
    base = csv_path.parent
    candidates = [root] if root != base else []
    candidates += [base / name for name in IMAGE_FOLDERS if (base / name).is_dir()] + [base]
    for folder in candidates:
        if any(is_image(n) for n in os.listdir(folder)):
            return csv_path, folder
    raise ZooError(f"--data-dir {root}: {csv_path} found but no images in {', '.join(str(c) for c in candidates)}. "
                   f"Expected {LAYOUT_HELP}")


def age_group(age: int, bins: tuple[int, ...]) -> int:
    """Index of the right-open bin [bins[i], bins[i+1]) holding `age`, or -1 outside them."""
    for i in range(len(bins) - 1):
        if bins[i] <= age < bins[i + 1]:
            return i
    return -1


def age_group_names(bins: tuple[int, ...]) -> list[str]:
    """Readable names of the right-open bins: '21' for a one-year bin, '24-30' otherwise."""
    return [str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(bins[:-1], bins[1:])]


# ----------------------------------------------------------------------------------------------------------------------
# Protocols (indices into the list of kept records)
# ----------------------------------------------------------------------------------------------------------------------
def closed_set_split(records: list[HandRecord], test_size: float = 0.2, seed: int = 42) -> tuple[list[int], list[int]]:
    """Upstream's split: per aspect, `train_test_split(rows, test_size, stratify=id, random_state=seed)` over the
    aspect's rows in file order; returns sorted (train, val) indices into `records`.

    A subject with a single row in an aspect cannot be stratified (upstream's code stops there): such rows go to
    train and the rest of the aspect is split as above.
    """
    from sklearn.model_selection import train_test_split

    train, val = [], []
    for aspect in ASPECTS:
        idx = np.array([i for i, r in enumerate(records) if r.aspect == aspect], dtype=int)
        if len(idx) == 0:
            continue
        ids = np.array([int(records[i].id) if records[i].id.isdigit() else records[i].id for i in idx])
        counts = Counter(ids.tolist())
        single = np.array([counts[v] < 2 for v in ids.tolist()])
        train += idx[single].tolist()
        idx, ids = idx[~single], ids[~single]
        if len(idx) < 2 or len(set(ids.tolist())) > len(idx) * test_size:
            train += idx.tolist()  # too few rows to hold out one per subject
            continue
        a, b = train_test_split(idx, test_size=test_size, stratify=ids, random_state=seed)
        train += a.tolist()
        val += b.tolist()
    return sorted(train), sorted(val)


def open_set_split(records: list[HandRecord], val_share: float = 0.2,
                   seed: int = 42) -> tuple[list[int], list[int], list[int]]:
    """Subject-disjoint (train, val, test) indices: subjects split in two halves (seeded), the first half's
    `val_share` of subjects held out for validation."""
    subjects = sorted({r.id for r in records})
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    half = len(order) // 2
    test_ids = set(order[half:])
    train_ids = order[:half]
    n_val = min(max(2, round(val_share * len(train_ids))), max(0, len(train_ids) - 2)) if val_share > 0 else 0
    val_ids = set(train_ids[:n_val])
    split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, r in enumerate(records):
        split["test" if r.id in test_ids else "val" if r.id in val_ids else "train"].append(i)
    return split["train"], split["val"], split["test"]


# ----------------------------------------------------------------------------------------------------------------------
# Resized cache
# ----------------------------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """$ZOO_CACHE_DIR, else <repo>/.zoo_cache (git-ignored)."""
    return Path(os.environ.get("ZOO_CACHE_DIR") or REPO_ROOT / ".zoo_cache")


def cache_key(folder: Path, names: list[str], size: int) -> str:
    """Hash of the size and every source file's name, byte size and modification time."""
    h = hashlib.sha1(f"{folder.resolve()}|{size}".encode())
    for name in sorted(names):
        st = (folder / name).stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def build_resized_cache(folder: Path, names: list[str], size: int) -> Path:
    """Write `size` x `size` copies of `folder/names` once (JPEG q95) under the cache root; returns the cache folder.

    Written to a temporary sibling and renamed, so concurrent runs never read half a cache; a changed source file
    changes the key, so the cache is rebuilt."""
    from PIL import Image

    out = cache_root() / "hands11k" / f"{size}px-{cache_key(folder, names, size)}"
    if (out / ".complete").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for name in names:
            im = Image.fromarray(load_rgb(folder / name)).resize((size, size), Image.BILINEAR)
            save_rgb(tmp / name, np.asarray(im), quality=95)
        (tmp / "manifest.json").write_text(json.dumps({"source": str(folder.resolve()), "size": size,
                                                       "images": len(names)}))
        (tmp / ".complete").touch()
        try:
            tmp.rename(out)
        except OSError:
            if not (out / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def silhouette(image: np.ndarray, threshold: int) -> np.ndarray:
    """Hand mask of a uint8 (H, W, 3) image on a white background: (H, W) float32, 1 where 255 - min(RGB) > threshold."""
    return ((255 - image.min(axis=2).astype(np.int16)) > threshold).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------------
def build_transform(image_size: int, train: bool):
    """albumentations: uint8 (H, W, 3) (+ mask) -> (3, S, S) float, ImageNet-normalised; training adds upstream's
    horizontal flip (0.5) and colour jitter (0.2, 0.2, 0.2, hue 0.2, p 0.5). Resize to S x S (aspect not kept)."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    s = int(image_size)
    ops = [A.Resize(s, s)]
    if train:
        ops += [A.HorizontalFlip(p=0.5), A.ColorJitter(0.2, 0.2, 0.2, 0.2, p=0.5)]
    return A.Compose([*ops, A.Normalize(mean=MEAN, std=STD), ToTensorV2()])


@dataclass
class HandItem:
    """One sample's labels: identity class (-1 = not a training class), gender class, age group, subject index
    (within the split, for retrieval), aspect index (into ASPECTS)."""

    image: str
    identity: int
    gender: int
    age: int
    person: int
    aspect: int


class HandImages(Dataset):
    """Items: {"image": (3, S, S) float, "mask": (1, S, S) float silhouette, "identity", "gender", "age", "person",
    "aspect": () long}."""

    def __init__(self, folder: Path, items: list[HandItem], transform, threshold: int = 40):
        self.folder, self.items, self.transform, self.threshold = folder, items, transform, threshold

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.items[i]
        image = load_rgb(self.folder / item.image)
        out = self.transform(image=image, mask=silhouette(image, self.threshold))
        sample = {"image": out["image"], "mask": torch.as_tensor(out["mask"], dtype=torch.float32)[None]}
        for k in ("identity", "gender", "age", "person", "aspect"):
            sample[k] = torch.tensor(getattr(item, k), dtype=torch.long)
        return sample


# ----------------------------------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------------------------------
class Hands11kDataModule(ZooDataModule):
    """11k Hands (or the built-in synthetic hands) for `models.hand.HandBiometrics` (module docstring: protocols).

    Batches: dicts of HandImages items. `describe()` reports what the reader found and the split sizes.
    """

    DEMO_NAME = "hands11k"
    LAYOUT_HELP = LAYOUT_HELP

    def __init__(self, cfg: Any, data_dir=None):
        super().__init__(cfg, data_dir)
        self.records: list[HandRecord] = []
        self.splits: dict[str, list[int]] = {}
        self.dropped: dict[str, int] = {}
        self.image_dir: Path | None = None
        self.source_dir: Path | None = None
        self.identity_names: list[str] = []

    # ----- demo data -----
    def make_demo(self, root: Path) -> None:
        from datamodules.hands11k_demo import write_demo_hands

        write_demo_hands(root, COLUMNS, ASPECTS)

    # ----- reading -----
    def _read(self) -> None:
        cfg = self.cfg
        csv_path, folder = find_layout(self.root)
        records = read_hand_info(csv_path)
        dropped: Counter = Counter()
        aspects = tuple(a.lower() for a in cfg.aspects)  # names validated with the config (HandConfig.CHECKS)
        kept = []
        for r in records:
            if not cfg.keep_accessories and r.accessories:
                dropped["accessories"] += 1
            elif aspects and r.aspect not in aspects:
                dropped["aspect_filter"] += 1
            elif age_group(r.age, tuple(cfg.age_bins)) < 0:
                dropped["age_outside_bins"] += 1
            else:
                kept.append(r)
        present = set(os.listdir(folder))
        missing = [r for r in kept if r.image not in present]
        if missing and not cfg.skip_missing_images:
            raise ZooError(f"{csv_path}: {len(missing)} row(s) name an image that is not in {folder}: "
                           f"{_examples([(r.row, r.image) for r in missing])}. Point --data-dir at the complete "
                           f"dataset, or --set skip_missing_images=true to skip those rows.")
        self.records_all = kept  # the protocol is computed on the CSV's rows, as upstream
        self.missing = {r.row for r in missing}
        if missing:
            dropped["missing_image"] = len(missing)
            print(f"[hands11k] skipped {len(missing)} CSV row(s) whose image is not in {folder} "
                  f"(skip_missing_images), e.g. {', '.join(r.image for r in missing[:3])}")
        # Empty, truncated or non-image files: reported and skipped (an error with strict_data), like every reader.
        shown = [folder / r.image for r in kept if r.row not in self.missing]
        good = set(drop_bad_images(shown, bool(cfg.strict_data), f"11k Hands {folder}"))
        unreadable = {r.row for r, p in zip((r for r in kept if r.row not in self.missing), shown) if p not in good}
        if unreadable:
            dropped["unreadable_image"] = len(unreadable)
            self.missing |= unreadable
        self.dropped = dict(dropped)
        self.csv_path, self.source_dir = csv_path, folder

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        cfg = self.cfg
        self._read()
        rec = self.records_all
        if cfg.protocol == "closed_set":
            train, val = closed_set_split(rec, cfg.val_fraction, cfg.split_seed)
            test: list[int] = []
        else:
            train, val, test = open_set_split(rec, cfg.open_val_identities, cfg.split_seed)
        keep = lambda idx: [i for i in idx if rec[i].row not in self.missing]  # noqa: E731
        train, val, test = keep(train), keep(val), keep(test)
        if not train or not val:
            raise ZooError(f"{self.csv_path}: the {cfg.protocol} protocol leaves {len(train)} training and {len(val)} "
                           f"validation image(s) after filtering; keep more aspects / rows (dropped: {self.dropped}).")
        # Encoders fitted on train (upstream: LabelEncoder on the integer ids, sorted), unless the config has them.
        names = list(cfg.identity_names) or sorted({rec[i].id for i in train}, key=_id_key)
        self.identity_names = names
        genders = list(cfg.gender_names) if cfg.gender_names else sorted({rec[i].gender for i in train})
        self.gender_names = genders
        unknown_gender = sorted({rec[i].gender for i in train + val + test} - set(genders))
        if unknown_gender:
            raise ZooError(f"{self.csv_path}: gender value(s) {unknown_gender} are not among {genders}; "
                           f"fix those rows (11k Hands uses 'male' / 'female').")
        self.splits = {"train": train, "val": val, "test": test}

    def _items(self, split: str) -> list[HandItem]:
        rec, cfg = self.records_all, self.cfg
        index = {n: i for i, n in enumerate(self.identity_names)}
        idx = self.splits[split]
        persons = {p: i for i, p in enumerate(sorted({rec[i].id for i in idx}, key=_id_key))}
        return [HandItem(rec[i].image, index.get(rec[i].id, -1), self.gender_names.index(rec[i].gender),
                         age_group(rec[i].age, tuple(cfg.age_bins)), persons[rec[i].id], ASPECTS.index(rec[i].aspect))
                for i in idx]

    def config_overrides(self) -> dict[str, Any]:
        return {"identity_names": tuple(self.identity_names), "num_identities": len(self.identity_names),
                "gender_names": tuple(self.gender_names), "num_age_groups": len(self.cfg.age_bins) - 1}

    def describe(self) -> dict[str, Any]:
        """What the reader found: split sizes, subjects, validation images per aspect, dropped rows by reason."""
        self.setup("fit")
        rec = self.records_all
        used = [i for s in self.splits.values() for i in s]
        return {"train": len(self.splits["train"]), "val": len(self.splits["val"]), "test": len(self.splits["test"]),
                "subjects": len({rec[i].id for i in used}), "protocol": self.cfg.protocol,
                "val_per_aspect": {a: sum(rec[i].aspect == a for i in self.splits["val"]) for a in ASPECTS},
                "dropped": dict(self.dropped)}

    def summary(self) -> str:
        d = self.describe()
        return (f"[hands11k] {self.csv_path}: {d['protocol']}, train {d['train']}, val {d['val']}, test {d['test']}, "
                f"{d['subjects']} subjects, dropped {d['dropped']}")

    # ----- cache, datasets, loaders -----
    def prepare_data(self) -> None:
        super().prepare_data()
        self.setup("fit")
        self.image_dir = self._cache()

    def _cache(self) -> Path:
        names = sorted({self.records_all[i].image for s in self.splits.values() for i in s})
        return build_resized_cache(self.source_dir, names, int(self.cfg.image_size))

    def dataset(self, split: str, train: bool = False) -> HandImages:
        self.setup("fit")
        if self.image_dir is None:
            self.image_dir = self._cache()
        return HandImages(self.image_dir, self._items(split), build_transform(self.cfg.image_size, train),
                          int(self.cfg.silhouette_threshold))

    def train_dataloader(self):
        return self.loader(self.dataset("train", train=True), train=True)

    def val_dataloader(self):
        return self.loader(self.dataset("val"), train=False)

    def test_dataloader(self):
        if not self.splits["test"]:
            raise ZooError("The closed_set protocol has no test split (upstream evaluates on validation): use "
                           "--validate, or --set protocol=open_set.")
        return self.loader(self.dataset("test"), train=False)


def _id_key(subject: str):
    return (0, int(subject), subject) if subject.isdigit() else (1, 0, subject)
