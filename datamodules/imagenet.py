"""ImageNet (or any ImageFolder-style set) in its published layout, with optional LV-ViT token labels.

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG
    <root>/LOC_synset_mapping.txt      optional: "n01440764 tench, Tinca tinca" per line -> class name "tench"

Token labels (`token_label_dir`): `<dir>/<class_dir>/<image_stem>.pt`, an fp16 tensor (2, 5, H, W) of the teacher's
top-5 scores and class indices per location. Training samples then carry the raw label map with the crop box (in
label-map coordinates) and flip of their augmentation; the dense targets are built on the device
(losses/token_labeling.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import Dataset

from datamodules.base import REPO_ROOT, ZooDataModule
from datamodules.demo import jitter, mark_demo, prototypes
from datamodules.recorded_crop import RecordedCropFlip
from zoo.checkpoint import safe_load
from zoo.errors import ZooError
from zoo.images import drop_bad_images, is_image, load_rgb, save_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNSET_FILE = "LOC_synset_mapping.txt"


# ----------------------------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ImageFolderIndex:
    """The images of one split: `samples` [(path, class index)], `classes` [folder name] in index order."""

    classes: list[str]
    samples: list[tuple[Path, int]]


def _class_dirs(split: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    out = []
    for dirpath, _, files in os.walk(folder):
        out += [Path(dirpath) / f for f in files if is_image(f) and not f.startswith(".")]
    return sorted(out)


def scan_split(root: Path, split: str, classes: list[str] | None = None) -> ImageFolderIndex:
    """Index `root/split/<class>/**/<image>`; with `classes` (train's) the split must use a subset of them."""
    folder = root / split
    layout = f"{root}/{split}/<class folder>/<images>, e.g. {split}/n01440764/n01440764_10026.JPEG"
    if not folder.is_dir():
        raise ZooError(f"No {split}/ folder under {root}. Expected {layout}. Point --data-dir at the folder that "
                       f"holds train/ and val/ (for ImageNet from Kaggle: ILSVRC/Data/CLS-LOC).")
    found = _class_dirs(folder)
    if not found:
        loose = [f for f in os.listdir(folder) if is_image(f)][:3]
        hint = (f" It holds images directly ({', '.join(loose)}, ...): sort them into one folder per class first "
                f"(e.g. ImageNet's valprep.sh, or LOC_val_solution.csv for the Kaggle release).") if loose else ""
        raise ZooError(f"{folder} has no class folders. Expected {layout}.{hint}")
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise ZooError(f"{split}/ has classes not in train/: {', '.join(extra[:5])}"
                           f"{' ...' if len(extra) > 5 else ''} ({len(extra)} in all) under {root}. Both splits must "
                           f"use the same class folder names.")
    index = {c: i for i, c in enumerate(classes)}
    samples = [(p, index[c]) for c in found for p in _images_in(folder / c)]
    if not samples:
        raise ZooError(f"No images under {folder}/<class>/ (looked for .jpg, .jpeg, .png, .pgm, ... in any letter "
                       f"case). Expected {layout}.")
    return ImageFolderIndex(classes, samples)


def drop_unreadable(index: ImageFolderIndex, strict: bool, where: str) -> ImageFolderIndex:
    """`index` without the files `zoo.images.probe_image` refuses (reported, or an error when `strict`)."""
    good = set(drop_bad_images([p for p, _ in index.samples], strict, where))
    samples = [(p, c) for p, c in index.samples if p in good]
    if not samples:
        raise ZooError(f"{where}: none of the {len(index.samples)} image files can be read.")
    return ImageFolderIndex(index.classes, samples)


def class_names(root: Path, wnids: list[str]) -> list[str]:
    """Readable names: the first name of each wnid's line in LOC_synset_mapping.txt when present, else the folder."""
    mapping_file = root / SYNSET_FILE
    if not mapping_file.is_file():
        return list(wnids)
    names = {}
    for n, line in enumerate(mapping_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, text = line.strip().partition(" ")
        if not text:
            raise ZooError(f"{mapping_file} line {n}: expected '<wnid> <name>[, <other names>]', got {line!r}.")
        names[wnid] = text.split(",")[0].strip()
    return [names.get(w, w) for w in wnids]


# ----------------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------------
class ImageFolderDataset(Dataset):
    """(path, label) samples -> {"image": (3, S, S) float tensor, "label": int}."""

    def __init__(self, index: ImageFolderIndex, transform):
        self.index, self.transform = index, transform

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.index.samples[i]
        return {"image": self.transform(Image.fromarray(load_rgb(path))), "label": label}


class TokenLabelDataset(ImageFolderDataset):
    """Training samples with LV-ViT token labels.

    Returns {"image", "label", "label_map": (2, 5, h, w) float16, "box": (4,) float32 crop box (x1, y1, x2, y2) in
    label-map cells, "flip": bool}. `crop` records the crop and flip; `rest` is the remaining timm pipeline.
    """

    def __init__(self, index: ImageFolderIndex, root: Path, label_dir: Path, crop: RecordedCropFlip, rest):
        super().__init__(index, rest)
        self.root, self.label_dir, self.crop = root, label_dir, crop

    def label_path(self, image: Path) -> Path:
        return self.label_dir / image.parent.name / f"{image.stem}.pt"

    def load_label_map(self, image: Path) -> torch.Tensor:
        path = self.label_path(image)
        if not path.is_file():
            raise ZooError(f"Token label file missing for image {image}: expected {path} "
                           f"(<token_label_dir>/<class folder>/<image stem>.pt). Make labels for every training image "
                           f"(`python -m models.demansia2.token_labels DATA --teacher T --out DIR`, or train with "
                           f"--set teacher=T), or train without --set token_label_dir.")
        try:
            label_map = safe_load(path, "token label file")
        except ZooError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise ZooError(f"Token label file {path} (for image {image}) cannot be read: {type(e).__name__}: "
                           f"{str(e)[:120]}. Regenerate it.") from None
        if not (isinstance(label_map, torch.Tensor) and label_map.ndim == 4 and label_map.shape[:2] == (2, 5)):
            shape = tuple(label_map.shape) if isinstance(label_map, torch.Tensor) else type(label_map).__name__
            raise ZooError(f"Token label file {path} (for image {image}) is malformed: expected a tensor of shape "
                           f"(2, 5, H, W) (top-5 scores, then class indices), got {shape}.")
        return label_map.to(torch.float16)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.index.samples[i]
        label_map = self.load_label_map(path)
        img = Image.fromarray(load_rgb(path))
        img, (x1, y1, x2, y2), flip = self.crop(img)  # box as fractions of the image
        h, w = label_map.shape[-2:]
        box = torch.tensor([x1 * w, y1 * h, x2 * w, y2 * h], dtype=torch.float32)
        return {"image": self.transform(img), "label": label, "label_map": label_map, "box": box, "flip": flip}


# ----------------------------------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------------------------------
class ImageNetDataModule(ZooDataModule):
    """ImageNet-style classification data (train/ and val/ class folders), demo data without --data-dir.

    Train: timm's pipeline (random resized crop scale (crop_scale_min, 1), flip 0.5, RandAugment `cfg.randaugment`,
    random erasing `cfg.random_erasing` in pixel mode); val: resize image_size / crop_pct, center crop image_size.
    Batches are dicts (see the datasets above). `config_overrides()` gives num_classes and class_names.
    """

    DEMO_NAME: ClassVar[str] = "imagenet"
    LAYOUT_HELP: ClassVar[str] = ("<root>/train/<class>/<images> and <root>/val/<class>/<images> (ImageNet, "
                                  "Imagenette or any ImageFolder-style set), optional <root>/LOC_synset_mapping.txt.")
    DEMO_CLASSES = 10
    DEMO_TRAIN_PER_CLASS = 40
    DEMO_VAL_PER_CLASS = 20
    DEMO_SIZE = 72

    def __init__(self, cfg: Any, data_dir: str | os.PathLike | None = None):
        super().__init__(cfg, data_dir)
        self.train_index: ImageFolderIndex | None = None
        self.val_index: ImageFolderIndex | None = None
        self.names: list[str] = []

    # ----- demo -----
    def make_demo(self, root: Path) -> None:
        """10 classes of smooth colour patterns (jittered, JPEG, 72 px) in the ImageNet layout, with a synset file."""
        size = self.DEMO_SIZE
        protos = prototypes(self.DEMO_CLASSES, size, seed=1234, grid=3)
        rng = np.random.default_rng(0)
        wnids = [f"n9{k:07d}" for k in range(self.DEMO_CLASSES)]
        lines = [f"{w} pattern {k}, demo class {k}" for k, w in enumerate(wnids)]
        (root / SYNSET_FILE).write_text("\n".join(lines) + "\n")
        mark_demo(root)
        for split, n in (("train", self.DEMO_TRAIN_PER_CLASS), ("val", self.DEMO_VAL_PER_CLASS)):
            for k, wnid in enumerate(wnids):
                for j in range(n):
                    save_rgb(root / split / wnid / f"{wnid}_{j:04d}.JPEG", jitter(protos[k], rng, noise=0.08))

    # ----- reading -----
    def setup(self, stage: str | None = None) -> None:
        if self.train_index is not None:
            return
        root = self.root
        self.train_index = scan_split(root, "train")
        self.val_index = scan_split(root, "val", self.train_index.classes)
        strict = bool(getattr(self.cfg, "strict_data", False))
        self.train_index = drop_unreadable(self.train_index, strict, f"{root}/train")
        self.val_index = drop_unreadable(self.val_index, strict, f"{root}/val")
        self.names = class_names(root, self.train_index.classes)
        label_dir = self.token_label_root()
        if label_dir and not label_dir.is_dir() and not getattr(self.cfg, "teacher", None):
            raise ZooError(f"token_label_dir {label_dir} is not a directory. Expected <dir>/<class folder>/"
                           f"<image stem>.pt (LV-ViT token labels) for every training image.")

    def token_label_root(self) -> Path | None:
        """Where the token labels are: `token_label_dir`, else with a `teacher` a cache folder named for the teacher
        and the data (<ZOO_CACHE_DIR or .zoo_cache>/token_labels/<teacher>-<hash>); None without either, and with
        `distill` (the teacher is then a distillation teacher: token labels only into a given token_label_dir)."""
        label_dir, teacher = getattr(self.cfg, "token_label_dir", None), getattr(self.cfg, "teacher", None)
        if label_dir:
            return Path(label_dir).expanduser()
        if not teacher or getattr(self.cfg, "distill", "none") != "none":
            return None
        import hashlib

        key = hashlib.sha256(f"{Path(teacher).expanduser().resolve() if Path(teacher).expanduser().is_file() else teacher}"
                             f"|{self.root.resolve()}".encode()).hexdigest()[:12]
        name = Path(teacher).stem if Path(teacher).expanduser().is_file() else teacher.replace("/", "_")
        return Path(os.environ.get("ZOO_CACHE_DIR") or REPO_ROOT / ".zoo_cache") / "token_labels" / f"{name}-{key}"

    def config_overrides(self) -> dict[str, Any]:
        return {"num_classes": len(self.train_index.classes), "class_names": tuple(self.names)}

    def summary(self) -> str:
        """One line about the data found, for the first line of a run."""
        kind = "demo data" if self.is_demo else "ImageFolder"
        return (f"{kind} at {self.root}: {len(self.train_index.classes)} classes, {len(self.train_index.samples)} train "
                f"/ {len(self.val_index.samples)} val images")

    # ----- transforms -----
    def train_transform(self, separate: bool = False):
        cfg = self.cfg
        return create_transform(
            cfg.image_size, is_training=True, scale=(cfg.crop_scale_min, 1.0), hflip=0.5, color_jitter=0.0,
            auto_augment=cfg.randaugment or None, interpolation=cfg.train_interpolation, mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            re_prob=cfg.random_erasing, re_mode="pixel", separate=separate,
        )

    def eval_transform(self):
        return eval_transform(self.cfg.image_size, self.cfg.crop_pct)

    def train_dataset(self) -> Dataset:
        label_dir = self.token_label_root()
        if not label_dir:
            return ImageFolderDataset(self.train_index, self.train_transform())
        _, augment, final = self.train_transform(separate=True)
        crop = RecordedCropFlip(self.cfg.image_size, scale=(self.cfg.crop_scale_min, 1.0),
                                interpolation=self.cfg.train_interpolation)
        from torchvision.transforms import Compose

        return TokenLabelDataset(self.train_index, self.root, label_dir, crop,
                                 Compose([*augment.transforms, *final.transforms]))

    def train_dataloader(self):
        return self.loader(self.train_dataset(), train=True)

    def val_dataloader(self):
        return self.loader(ImageFolderDataset(self.val_index, self.eval_transform()), train=False)

    def test_dataloader(self):
        """ImageNet's labelled val/ is its test set (the test/ images have no public labels)."""
        return self.val_dataloader()


def eval_transform(image_size: int, crop_pct: float):
    """Resize the short side to image_size / crop_pct (bicubic), center crop image_size, normalise."""
    return create_transform(image_size, is_training=False, crop_pct=crop_pct, interpolation="bicubic",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)
