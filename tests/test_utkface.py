"""UTKFace reading: file-name parsing, skipped-file report, recursion and de-duplication, seeded stratified splits."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from datamodules.utkface import (
    UTKFaceDataModule,
    UTKFaceLabel,
    parse_utkface_name,
    scan_utkface,
    split_indices,
    strata_of,
)
from model_config import AgeGenderConfig
from zoo.errors import ZooError
from zoo.images import save_rgb


@pytest.mark.parametrize("name, label", [
    ("1_0_0_20161219140623097.jpg.chip.jpg", UTKFaceLabel(1, 0, 0)),   # aligned & cropped release
    ("26_1_3_20170119180036456.jpg", UTKFaceLabel(26, 1, 3)),          # in-the-wild parts
    ("116_0_4_20170120134921760.JPG", UTKFaceLabel(116, 0, 4)),
    ("39_1_20170116174525125.jpg.chip.jpg", UTKFaceLabel(39, 1, -1)),  # published name without race: kept
    ("61_3_20170109150557335.jpg.chip.jpg", None),                     # gender must be 0 or 1
    ("x_0_1_20170109150557335.jpg", None),
    ("25_0.jpg", None),
    ("portrait.jpg", None),
    ("", None),
])
def test_parse_names(name, label):
    assert parse_utkface_name(name) == label


def _tree(root, names):
    pixel = np.zeros((8, 8, 3), np.uint8)
    for name in names:
        save_rgb(root / name, pixel)


def test_scan_recurses_skips_and_reports(tmp_path, caplog):
    _tree(tmp_path, [
        "UTKFace/20_0_0_20170101000000001.jpg.chip.jpg",
        "crop_part1/20_0_0_20170101000000001.jpg.chip.jpg",  # the same photo again: read once
        "part1/20_0_0_20170101000000001.jpg",               # its in-the-wild original: the aligned crop wins
        "part2/35_1_2_20170101000000002.jpg",
        "40_1_1_20170101000000003.jpg.chip.jpg",            # directly in the root
        "UTKFace/bad_name.jpg", "UTKFace/3_7_0_20170101000000004.jpg", "UTKFace/200_0_0_20170101000000005.jpg",
    ])
    (tmp_path / "README.txt").write_text("not an image: ignored")
    scan = scan_utkface(tmp_path, max_age=116)
    assert [p.relative_to(tmp_path).as_posix() for p in scan.paths] == [
        "40_1_1_20170101000000003.jpg.chip.jpg",
        "UTKFace/20_0_0_20170101000000001.jpg.chip.jpg",
        "part2/35_1_2_20170101000000002.jpg",
    ]
    assert [lab.age for lab in scan.labels] == [40, 20, 35]
    assert len(scan.skipped) == 3 and scan.duplicates == 2
    line = scan.report()
    assert "\n" not in line and "skipped 3 image(s)" in line and "bad_name.jpg" in line

    cfg = AgeGenderConfig.from_presets("micro").replace(num_workers=0, split=(0.34, 0.33, 0.33))
    dm = UTKFaceDataModule(cfg, data_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    warnings = [r for r in caplog.records if "skipped 3 image(s)" in r.getMessage()]
    assert len(warnings) == 1
    assert sum(len(ds) for ds in dm.datasets.values()) == 3


def test_empty_dir_is_a_clear_error(tmp_path):
    _tree(tmp_path, ["nope.jpg"])
    dm = UTKFaceDataModule(AgeGenderConfig.from_presets("micro"), data_dir=tmp_path)
    with pytest.raises(ZooError, match=r"usable image.*\[age\]_\[gender\]"):
        dm.setup("fit")


def _labels(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 90, n), rng.integers(0, 2, n)


def test_split_is_seeded_disjoint_and_complete():
    ages, genders = _labels()
    a = split_indices(ages, genders, (0.8, 0.1, 0.1), seed=1)
    b = split_indices(ages, genders, (0.8, 0.1, 0.1), seed=1)
    c = split_indices(ages, genders, (0.8, 0.1, 0.1), seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert [len(s) for s in a] == [800, 100, 100]
    assert np.array_equal(np.sort(np.concatenate(a)), np.arange(1000))  # every file in exactly one split


def test_stratified_split_keeps_proportions():
    ages, genders = _labels()
    strata = strata_of(ages, genders)
    overall = np.bincount(strata, minlength=20) / len(strata)
    for part in split_indices(ages, genders, (0.8, 0.1, 0.1), seed=3, stratify=True):
        share = np.bincount(strata[part], minlength=20) / len(part)
        assert np.abs(share - overall).max() < 0.02
        assert abs(genders[part].mean() - genders.mean()) < 0.02


def test_published_split_has_no_test_and_tiny_sets_still_split():
    ages, genders = _labels(50)
    train, val, test = split_indices(ages, genders, (0.8, 0.2, 0.0), seed=0)
    assert (len(train), len(val), len(test)) == (40, 10, 0)
    train, val, test = split_indices(ages[:5], genders[:5], (0.6, 0.2, 0.2), seed=0)  # strata too small: pooled
    assert sorted(np.concatenate([train, val, test]).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ZooError, match="split"):
        split_indices(ages, genders, (0.8, 0.0, 0.2), seed=0)


def test_demo_data_and_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DEMO_DIR", str(tmp_path))
    monkeypatch.setattr(UTKFaceDataModule, "DEMO_SIZE", 60)
    cfg = AgeGenderConfig.from_presets("micro").replace(num_workers=0, batch_size=8)
    dm = UTKFaceDataModule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.scan.skipped == ["UTKFace/portrait_unlabelled.jpg.chip.jpg"]
    assert len(dm.scan.paths) == 60 and -1 in {lab.race for lab in dm.scan.labels}
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype.is_floating_point
    assert batch["age"].shape == (8,) and set(batch["gender"].tolist()) <= {0.0, 1.0}
    assert abs(float(batch["image"].mean())) < 1.5  # normalised, not 0..255
