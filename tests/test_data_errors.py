"""Bad image files: found before training by a header check (counted, named, skipped; strict_data makes them an
error), 16-bit PNGs read correctly, and predict verbs that report the bad image and go on with the good ones."""
from __future__ import annotations

import argparse
import io
import logging

import numpy as np
import pytest
from PIL import Image

from model_config import AgeGenderConfig, DeMansia2Config, FaceConfig
from zoo.errors import ZooError
from zoo.images import (
    ImageReadError,
    drop_bad_images,
    is_image,
    load_rgb,
    missing_image_message,
    probe_image,
    save_rgb,
)

BAD = {"corrupt.jpg": "not an image", "truncated.png": "truncated", "empty.jpg": "empty file", "notes.jpg": "not an image"}


def jpeg_bytes(seed: int = 0, size: int = 24) -> bytes:
    rgb = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    return buf.getvalue()


def write_bad_files(folder, prefix: str = "") -> dict[str, str]:
    """The four kinds of broken file a real dataset holds, and a 16-bit PNG (which is fine). Returns {name: reason}."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes()
    (folder / f"{prefix}corrupt.jpg").write_bytes(good[:2] + bytes(64) + good[66:])  # SOI, then a destroyed header
    png = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((48, 48, 3)) * 255).astype(np.uint8)).save(png, "PNG")
    (folder / f"{prefix}truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / f"{prefix}empty.jpg").write_bytes(b"")
    (folder / f"{prefix}notes.jpg").write_text("these are my notes, not a photo\n")
    write_16bit_png(folder / f"{prefix}sixteen.png")
    return {prefix + k: v for k, v in BAD.items()}


def write_16bit_png(path, size: int = 24) -> np.ndarray:
    """A 16-bit grayscale gradient (mode I;16); returns the 8-bit values it should read as."""
    values = np.linspace(0, 65535, size * size).reshape(size, size).astype(np.uint16)
    Image.fromarray(values).save(path)
    return np.rint(values / 257.0).astype(np.uint8)


def test_probe_names_each_kind_of_bad_file(tmp_path):
    reasons = write_bad_files(tmp_path)
    for name, reason in reasons.items():
        assert reason in probe_image(tmp_path / name), name
    assert probe_image(tmp_path / "sixteen.png") is None
    assert probe_image(tmp_path / "absent.jpg") == "not found"
    for name in reasons:  # the full decode fails too, with a message naming the file
        with pytest.raises(ImageReadError, match=name):
            load_rgb(tmp_path / name)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    expected = write_16bit_png(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode == "I;16"
    rgb = load_rgb(tmp_path / "x.png")
    assert rgb.shape == (24, 24, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    assert rgb.min() == 0 and rgb.max() == 255 and 120 < rgb.mean() < 135  # not the all-white PIL convert gives


def test_drop_bad_images_reports_count_and_names_or_raises_when_strict(tmp_path, caplog):
    reasons = write_bad_files(tmp_path)
    paths = sorted(tmp_path.iterdir())
    with caplog.at_level(logging.WARNING):
        good = drop_bad_images(paths, where="mydata")
    assert good == [tmp_path / "sixteen.png"]
    assert "mydata: 4 of 5 image file(s) cannot be read" in caplog.text and "empty.jpg (empty file)" in caplog.text
    assert "strict_data=true" in caplog.text
    with pytest.raises(ZooError, match=r"4 of 5 image file\(s\) cannot be read: .*corrupt.jpg") as e:
        drop_bad_images(paths, strict=True, where="mydata")
    assert "\n" not in str(e.value)
    assert set(reasons) <= {p.name for p in paths}


# ----- every datamodule checks its files in setup -----
def test_imagenet_setup_skips_bad_files_and_trains_on_16bit(tmp_path, caplog):
    from datamodules.imagenet import ImageNetDataModule

    for split in ("train", "val"):
        for c in ("n01", "n02"):
            for i in range(3):
                save_rgb(tmp_path / split / c / f"{c}_{i}.JPEG", np.full((16, 16, 3), 60 * i, np.uint8))
    write_bad_files(tmp_path / "train" / "n01")
    cfg = DeMansia2Config.from_presets("micro").replace(image_size=16, num_workers=0, batch_size=2)
    with caplog.at_level(logging.WARNING):
        dm = ImageNetDataModule(cfg, tmp_path)
        dm.setup("fit")
    names = {p.name for p, _ in dm.train_index.samples}
    assert len(dm.train_index.samples) == 7 and "sixteen.png" in names and not names & set(BAD)
    assert "4 of 11 image file(s) cannot be read" in caplog.text
    item = dm.train_dataset()[[p.name for p, _ in dm.train_index.samples].index("sixteen.png")]
    assert item["image"].shape == (3, 16, 16)
    with pytest.raises(ZooError, match="4 of 11"):
        ImageNetDataModule(cfg.replace(strict_data=True), tmp_path).setup("fit")


def test_lfw_setup_skips_bad_files(tmp_path, caplog):
    from datamodules.lfw import LFWDataModule

    for n in range(6):
        for i in range(1, 4):
            save_rgb(tmp_path / f"P_{n}" / f"P_{n}_{i:04d}.jpg", np.full((16, 16, 3), 40 * n, np.uint8))
    write_bad_files(tmp_path / "P_0", prefix="P_0_x")
    cfg = FaceConfig.from_presets("micro").replace(image_size=16, split=(0.5, 0.25, 0.25), num_workers=0)
    with caplog.at_level(logging.WARNING):
        dm = LFWDataModule(cfg, tmp_path)
        dm.setup("fit")
    every = [p.name for split in dm.people.values() for ims in split.values() for p in ims]
    assert len(every) == 6 * 3 + 1 and "P_0_xsixteen.png" in every
    assert "4 of 23 image file(s) cannot be read" in caplog.text
    with pytest.raises(ZooError, match="4 of 23"):
        LFWDataModule(cfg.replace(strict_data=True), tmp_path).setup("fit")


def test_utkface_setup_skips_bad_files(tmp_path, caplog):
    from datamodules.utkface import UTKFaceDataModule

    for i in range(12):
        save_rgb(tmp_path / f"{20 + i}_{i % 2}_0_2017010100000{i:04d}.jpg.chip.jpg", np.full((16, 16, 3), 9 * i, np.uint8))
    write_bad_files(tmp_path, prefix="30_1_0_20170101")
    cfg = AgeGenderConfig.from_presets("micro").replace(image_size=16, num_workers=0, stratify=False)
    with caplog.at_level(logging.WARNING):
        dm = UTKFaceDataModule(cfg, tmp_path)
        dm.setup("fit")
    assert len(dm.scan.paths) == 13 and "4 of 17 image file(s) cannot be read" in caplog.text
    with pytest.raises(ZooError, match="4 of 17"):
        UTKFaceDataModule(cfg.replace(strict_data=True), tmp_path).setup("fit")


# ----- predict verbs: the good images are answered, the bad one named, exit status 1 -----
@pytest.fixture
def folder_with_one_bad_image(tmp_path):
    folder = tmp_path / "photos"
    save_rgb(folder / "a.jpg", np.full((32, 32, 3), 100, np.uint8))
    write_16bit_png(folder / "b.PNG")
    (folder / "c.jpg").write_text("not an image")
    return folder


def test_classify_prints_good_images_and_names_the_bad_one(folder_with_one_bad_image, capsys):
    from models.demansia2.module import DeMansia2
    from models.demansia2.verbs import COMMANDS

    model = DeMansia2(DeMansia2Config.from_presets("micro").replace(image_size=32, num_classes=3,
                                                                    class_names=("x", "y", "z")))
    args = argparse.Namespace(images=[str(folder_with_one_bad_image)], top_k=2, batch_size=8, json=False)
    assert COMMANDS[0].run(model, args) == 1
    out, err = capsys.readouterr()
    assert "a.jpg" in out and "b.PNG" in out and "c.jpg" not in out
    assert "1 of 3 image(s) could not be read" in err and "c.jpg: not an image" in err


def test_agegender_predict_prints_good_images_and_names_the_bad_one(folder_with_one_bad_image, capsys):
    from models.agegender.module import AgeGender
    from models.agegender.verbs import COMMANDS

    model = AgeGender(AgeGenderConfig.from_presets("micro").replace(image_size=32)).eval()
    args = argparse.Namespace(images=[str(folder_with_one_bad_image)], batch_size=8, json=False)
    assert COMMANDS[0].run(model, args) == 1
    out, err = capsys.readouterr()
    assert out.count("\tage ") == 2 and "c.jpg: not an image" in err


def test_a_missing_image_gives_the_same_message_in_every_task(tmp_path):
    from models.agegender.module import AgeGender
    from models.agegender.verbs import COMMANDS as AGEGENDER
    from models.demansia2.module import DeMansia2
    from models.demansia2.verbs import COMMANDS as DEMANSIA2
    from models.face.module import FaceEmbedder
    from models.face.verbs import COMMANDS as FACE

    missing = tmp_path / "nope.jpg"
    save_rgb(tmp_path / "ok.jpg", np.zeros((8, 8, 3), np.uint8))
    expected = missing_image_message(missing)
    runs = [
        (DEMANSIA2[0], DeMansia2(DeMansia2Config.from_presets("micro").replace(num_classes=3)),
         argparse.Namespace(images=[str(missing)], top_k=1, batch_size=4, json=False)),
        (AGEGENDER[0], AgeGender(AgeGenderConfig.from_presets("micro")),
         argparse.Namespace(images=[str(missing)], batch_size=4, json=False)),
        (FACE[0], FaceEmbedder(FaceConfig.from_presets("micro")),
         argparse.Namespace(image_a=str(tmp_path / "ok.jpg"), image_b=str(missing), threshold=None, json=False)),
    ]
    for command, model, args in runs:
        with pytest.raises(ZooError) as e:
            command.run(model, args)
        assert str(e.value) == expected, command.name


def test_image_extensions_are_pils_in_any_case():
    for name in ("a.jpg", "b.JPEG", "c.pgm", "d.PGM", "e.Png", "f.tif", "g.webp", "h.bmp", "i.ppm"):
        assert is_image(name), name
    for name in ("notes.txt", "pairs.txt", "model.ckpt", "x.pdf", "jpg"):
        assert not is_image(name), name
