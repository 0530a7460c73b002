"""Palm folders: recursive search, mixed extensions, unreadable and non-image files reported and skipped, identities
from the folder per person, resize + center crop, the empty-folder error, the demo set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.palms import PalmDataModule, resize_center_crop, scan_palms
from model_config import PalmConfig
from zoo.errors import ZooError

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(**kw) -> PalmConfig:
    return PalmConfig.from_presets("micro").replace(**{"image_size": 16, "num_workers": 0, "batch_size": 2, **kw})


def write(path, size=(24, 16), color=(200, 150, 120), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(path, format=fmt)


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "palms"
    write(root / "alice" / "a.JPG")
    write(root / "alice" / "session2" / "b.png")
    write(root / "alice" / "c.Tiff")
    write(root / "bob" / "x.bmp")
    write(root / "bob" / "y.jpeg")
    write(root / "bob" / "z.PNG")
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")  # corrupt
    (root / "bob" / "empty.png").write_bytes(b"")  # empty
    (root / "alice" / "notes.txt").write_text("left hand, session 2")  # not an image
    (root / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored silently
    return root


def test_folder_with_corrupt_empty_and_non_image_files(messy, capsys):
    dm = PalmDataModule(cfg(split=(1.0, 0.0, 0.0)), data_dir=messy)
    dm.setup("fit")
    info = dm.describe()
    assert info["train"] == 6 and info["val"] == 0 and info["test"] == 0
    assert info["identities"] == 2 and dm.identities == ["alice", "bob"]
    assert info["skipped"]["unreadable"] == 2 and info["skipped"]["not_image"] == 1
    examples = " ".join(info["skipped"]["examples"])
    assert "broken.jpg" in examples and "empty.png" in examples and "notes.txt" in examples
    out = capsys.readouterr().out
    assert "skipped" in out and "broken.jpg" in out and "2 unreadable" in out
    # nested sub-folders belong to their first-level person folder; labels index the sorted identities
    by_name = {p.name: dm.identities[y] for p, y in dm.splits["train"]}
    assert by_name == {"a.JPG": "alice", "b.png": "alice", "c.Tiff": "alice", "x.bmp": "bob", "y.jpeg": "bob",
                       "z.PNG": "bob"}
    ds = dm.dataset("train")
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert abs(float(x[0, 0, 0]) - 200 / 255) < 0.02  # RGB order kept


def test_strict_data_turns_skipping_into_an_error(messy):
    dm = PalmDataModule(cfg(strict_data=True), data_dir=messy)
    with pytest.raises(ZooError, match="broken.jpg"):
        dm.setup("fit")


def test_empty_folder_and_folder_without_images_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZooError, match="no readable image"):
        PalmDataModule(cfg(), data_dir=tmp_path / "empty").setup("fit")
    (tmp_path / "junk" / "p1").mkdir(parents=True)
    (tmp_path / "junk" / "p1" / "readme.md").write_text("nothing")
    with pytest.raises(ZooError, match="no readable image"):
        PalmDataModule(cfg(), data_dir=tmp_path / "junk").setup("fit")
    with pytest.raises(ZooError, match="does not exist"):
        PalmDataModule(cfg(), data_dir=tmp_path / "missing")


def test_resize_and_center_crop_keep_the_middle():
    # 40 x 20 landscape: red 10-px bands left and right, green middle -> the 16 x 16 crop is all green
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :10] = (255, 0, 0)
    image[:, 30:] = (255, 0, 0)
    image[:, 10:30] = (0, 255, 0)
    out = resize_center_crop(image, 16)
    assert out.shape == (16, 16, 3)
    assert out[:, 2:14, 1].min() > 200 and out[:, 2:14, 0].max() < 60


def test_images_directly_in_the_root_are_one_identity_each(tmp_path):
    write(tmp_path / "p1.jpg")
    write(tmp_path / "p2.png")
    scan = scan_palms(tmp_path)
    assert scan.identities == ["p1", "p2"]


def test_demo_palms_in_the_folder_per_person_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DEMO_DIR", str(tmp_path))
    dm = PalmDataModule(cfg())
    dm.prepare_data()
    dm.setup("fit")
    info = dm.describe()
    assert info["identities"] == 8 and info["train"] + info["val"] + info["test"] == 96
    assert info["val"] >= 1 and info["skipped"]["unreadable"] == 0
    assert sorted(p.name for p in (tmp_path / "palms").iterdir() if p.is_dir())[0] == "person_000"
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and labels.dtype == torch.int64


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_images_to_validate_is_an_up_front_error(tmp_path, n):
    # one or two images leave the validation share empty: no val/loss, so no best-*.ckpt; said before training
    for k in range(n):
        write(tmp_path / "p1" / f"{k}.png")
    with pytest.raises(ZooError, match=rf"{n} readable image.*at least 3.*split=1,0,0"):
        PalmDataModule(cfg(batch_size=1), data_dir=tmp_path).setup("fit")
    # asked for explicitly, training without validation stays possible
    dm = PalmDataModule(cfg(batch_size=1, split=(1.0, 0.0, 0.0)), data_dir=tmp_path)
    dm.setup("fit")
    assert dm.describe()["train"] == n
