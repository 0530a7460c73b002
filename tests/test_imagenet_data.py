"""datamodules/imagenet.py: the ImageNet folder layout, class names, grayscale/CMYK JPEGs, errors, demo data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.imagenet import ImageNetDataModule
from model_config import DeMansia2Config
from zoo.errors import ZooError


def cfg(**changes) -> DeMansia2Config:
    return DeMansia2Config.from_presets("micro").replace(image_size=32, batch_size=4, num_workers=0, **changes)


def write_jpeg(path: Path, mode: str = "RGB", size: int = 40, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(arr)
    im = im.convert(mode) if mode != "RGB" else im
    im.save(path, "JPEG")


def make_layout(root: Path, train=("n01440764", "n01443537"), val=("n01440764", "n01443537"), per_class: int = 2):
    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            for j in range(per_class):
                write_jpeg(root / split / c / f"{c}_{j}.JPEG", seed=j)
    return root


def test_layout_classes_and_synset_names(tmp_path):
    root = make_layout(tmp_path)
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    dm = ImageNetDataModule(cfg(), data_dir=root)
    dm.setup("fit")
    assert dm.config_overrides() == {"num_classes": 2, "class_names": ("tench", "goldfish")}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.int64
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 3, 32, 32)
    assert sorted(val["label"].tolist()) == [0, 0, 1, 1]


def test_folder_names_without_synset_file(tmp_path):
    dm = ImageNetDataModule(cfg(), data_dir=make_layout(tmp_path, train=("cat", "dog"), val=("dog",)))
    dm.setup("fit")
    assert dm.config_overrides()["class_names"] == ("cat", "dog")
    assert {label for _, label in dm.val_index.samples} == {1}  # val uses train's class indices


def test_grayscale_and_cmyk_jpegs_become_rgb(tmp_path):
    root = make_layout(tmp_path)
    write_jpeg(root / "train" / "n01440764" / "gray.JPEG", mode="L")
    write_jpeg(root / "train" / "n01440764" / "cmyk.JPEG", mode="CMYK")
    assert Image.open(root / "train" / "n01440764" / "cmyk.JPEG").mode == "CMYK"
    dm = ImageNetDataModule(cfg(), data_dir=root)
    dm.setup("fit")
    ds = dm.train_dataset()
    for i, (path, _) in enumerate(ds.index.samples):
        if path.stem in ("gray", "cmyk"):
            assert ds[i]["image"].shape == (3, 32, 32)


def test_wrong_layouts_say_what_was_expected(tmp_path):
    with pytest.raises(ZooError, match="does not exist"):
        ImageNetDataModule(cfg(), data_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZooError, match=r"No train/ folder under .*empty"):
        ImageNetDataModule(cfg(), data_dir=tmp_path / "empty").setup("fit")
    extra = make_layout(tmp_path / "extra", val=("n01440764", "n09999999"))
    with pytest.raises(ZooError, match=r"val/ has classes not in train/: n09999999"):
        ImageNetDataModule(cfg(), data_dir=extra).setup("fit")
    flat = make_layout(tmp_path / "flat", val=())
    write_jpeg(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ZooError, match=r"val has no class folders.*holds images directly"):
        ImageNetDataModule(cfg(), data_dir=flat).setup("fit")
    noval = make_layout(tmp_path / "noval", val=())
    with pytest.raises(ZooError, match=r"No val/ folder"):
        ImageNetDataModule(cfg(), data_dir=noval).setup("fit")


def test_demo_data_is_generated_in_the_real_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setattr(ImageNetDataModule, "DEMO_TRAIN_PER_CLASS", 3)
    monkeypatch.setattr(ImageNetDataModule, "DEMO_VAL_PER_CLASS", 2)
    dm = ImageNetDataModule(cfg())
    dm.prepare_data()
    dm.setup("fit")
    root = tmp_path / "demo" / "imagenet"
    assert (root / "LOC_synset_mapping.txt").is_file() and (root / ".complete").exists()
    assert len(list((root / "train").glob("*/*.JPEG"))) == 30 and len(list((root / "val").glob("*/*.JPEG"))) == 20
    over = dm.config_overrides()
    assert over["num_classes"] == 10 and over["class_names"][0] == "pattern 0"
