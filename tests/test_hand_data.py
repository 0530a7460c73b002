"""11k Hands reader and protocols on fixtures written in the exact published format (CRLF, quoted zero-padded ids,
the nine columns): validation errors, filters, age groups, the closed-set split against an independent pandas
recomputation of upstream's rules, the open-set split, the resized cache and describe()."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.model_selection import train_test_split

from datamodules.hands11k import (
    ASPECTS,
    COLUMNS,
    Hands11kDataModule,
    age_group,
    find_layout,
    read_hand_info,
)
from model_config import HandConfig
from zoo.errors import ZooError

AGES = (18, 20, 21, 22, 23, 24, 30, 31, 75)


def write_fixture(root: Path, n_subjects: int = 9, per_aspect: int = 6, images: bool = True, header=COLUMNS,
                  mutate=None) -> Path:
    """HandInfo.csv + Hands/ in the published format; `mutate(fields)` may edit a row's nine field strings."""
    rng = np.random.default_rng(1)
    lines = [",".join(header)]
    n = 0
    (root / "Hands").mkdir(parents=True, exist_ok=True)
    for s in range(n_subjects):
        for aspect in ASPECTS:
            for k in range(per_aspect + (s % 3 == 0)):  # uneven counts; some subjects have one more image
                n += 1
                name = f"Hand_{n:07d}.jpg"
                acc = int(k == 0 and s % 4 == 1)
                fields = [f'"{s * 3:07d}"', str(AGES[s % len(AGES)]), '"male"' if s % 2 else '"female"', '"fair"',
                          str(acc), "0", f'"{aspect}"', f'"{name}"', "0"]
                if mutate:
                    fields = mutate(n, fields)
                lines.append(",".join(fields))
                if images:
                    arr = np.full((12, 16, 3), 255, np.uint8)
                    arr[3:9, 4:12] = rng.integers(0, 200, 3)
                    Image.fromarray(arr).save(root / "Hands" / name)
    (root / "HandInfo.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return root


@pytest.fixture(scope="module")
def hands(tmp_path_factory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("hands"))


def cfg(**kw) -> HandConfig:
    return HandConfig.from_presets("micro").replace(num_workers=0, image_size=32, **kw)


def test_reader_keeps_zero_padded_ids_and_layout_from_either_folder(hands):
    records = read_hand_info(hands / "HandInfo.csv")
    assert records[0].id == "0000000" and records[-1].id == f"{8 * 3:07d}" and records[0].row == 2
    assert {r.aspect for r in records} == set(ASPECTS)
    assert find_layout(hands) == (hands / "HandInfo.csv", hands / "Hands")
    assert find_layout(hands / "Hands") == (hands / "HandInfo.csv", hands / "Hands")


def test_age_groups_are_right_open_bins():
    bins = (0, 21, 22, 23, 24, 31, 76)
    assert [age_group(a, bins) for a in (18, 20, 21, 22, 23, 24, 30, 31, 75, 76)] == [0, 0, 1, 2, 3, 4, 4, 5, 5, -1]
    ref = pd.cut(pd.Series([18, 20, 21, 22, 23, 24, 30, 31, 75]), bins=list(bins), labels=range(6), right=False)
    assert [age_group(a, bins) for a in (18, 20, 21, 22, 23, 24, 30, 31, 75)] == ref.astype(int).tolist()


def upstream_split(csv: Path) -> tuple[set[str], set[str], dict[str, int]]:
    """Upstream's rules written independently with pandas: drop accessories, per aspect (p/d, r/l from the string)
    train_test_split(df, 0.2, stratify=id, random_state=42)."""
    df = pd.read_csv(csv)
    df = df[df.accessories == 0]
    train, val, per_aspect = [], [], {}
    for aspect in ASPECTS:
        part = df[(df.aspectOfHand.str.startswith(aspect[0])) & (df.aspectOfHand.str.endswith(aspect.split()[1]))]
        a, b = train_test_split(part, test_size=0.2, stratify=part["id"], random_state=42)
        train.append(a)
        val.append(b)
        per_aspect[aspect] = len(b)
    return set(pd.concat(train).imageName), set(pd.concat(val).imageName), per_aspect


def test_closed_set_split_equals_upstream_recomputation(hands):
    dm = Hands11kDataModule(cfg(), hands)
    dm.setup("fit")
    rec = dm.records_all
    train = {rec[i].image for i in dm.splits["train"]}
    val = {rec[i].image for i in dm.splits["val"]}
    ref_train, ref_val, ref_per_aspect = upstream_split(hands / "HandInfo.csv")
    assert train == ref_train and val == ref_val
    d = dm.describe()
    assert d["val_per_aspect"] == ref_per_aspect and d["test"] == 0
    assert d["train"] == len(ref_train) and d["val"] == len(ref_val) and d["subjects"] == 9
    assert d["dropped"] == {"accessories": 2 * 4}  # subjects 1 and 5, one row per aspect
    assert dm.identity_names == [f"{s * 3:07d}" for s in range(9)]  # encoder fitted on train: sorted ids


def test_open_set_split_is_subject_disjoint(hands):
    dm = Hands11kDataModule(cfg(protocol="open_set", open_val_identities=0.25), hands)
    dm.setup("fit")
    subjects = {s: {dm.records_all[i].id for i in dm.splits[s]} for s in ("train", "val", "test")}
    assert subjects["train"] and subjects["val"] and subjects["test"]
    assert not subjects["train"] & subjects["test"] and not subjects["train"] & subjects["val"]
    assert not subjects["val"] & subjects["test"]
    assert len(subjects["test"]) == 9 - 9 // 2
    items = dm._items("test")
    assert all(it.identity == -1 for it in items)  # test subjects are no training class
    assert dm.describe()["test"] == len(dm.splits["test"])


def test_filters_aspects_and_accessories(hands):
    dm = Hands11kDataModule(cfg(aspects=("dorsal left",), keep_accessories=True), hands)
    d = dm.describe()
    assert set(k for k, v in d["val_per_aspect"].items() if v) == {"dorsal left"}
    assert "accessories" not in d["dropped"] and d["dropped"]["aspect_filter"] > 0
    with pytest.raises(ZooError, match=r"aspects element 0 \('palm'\) must be an aspect: palmar right"):
        Hands11kDataModule(cfg(aspects=("palm",)), hands).setup("fit")


@pytest.mark.parametrize("mutate, words", [
    (lambda n, f: f[:6] + ['"dorsal middle"'] + f[7:] if n in (3, 5) else f,
     ["2 row(s) have an unknown aspectOfHand", "line 4 ('dorsal middle')", "palmar right"]),
    (lambda n, f: f[:1] + ["twenty"] + f[2:] if n == 7 else f, ["1 row(s) have an age", "line 8 ('twenty')"]),
])
def test_bad_rows_name_file_lines_and_fix(tmp_path, mutate, words):
    root = write_fixture(tmp_path, n_subjects=2, per_aspect=2, images=False, mutate=mutate)
    with pytest.raises(ZooError) as e:
        read_hand_info(root / "HandInfo.csv")
    assert str(root / "HandInfo.csv") in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_renamed_column_is_named(tmp_path):
    header = tuple("aspect" if c == "aspectOfHand" else c for c in COLUMNS)
    root = write_fixture(tmp_path, n_subjects=2, per_aspect=2, images=False, header=header)
    with pytest.raises(ZooError, match="missing column.*aspectOfHand.*found instead: aspect"):
        read_hand_info(root / "HandInfo.csv")


def test_missing_images_error_or_skip(tmp_path):
    root = write_fixture(tmp_path, n_subjects=4, per_aspect=5)
    for name in ("Hand_0000002.jpg", "Hand_0000009.jpg"):
        (root / "Hands" / name).unlink()
    with pytest.raises(ZooError, match=r"2 row\(s\) name an image.*line 3 \('Hand_0000002.jpg'\).*skip_missing_images"):
        Hands11kDataModule(cfg(), root).setup("fit")
    dm = Hands11kDataModule(cfg(skip_missing_images=True), root)
    d = dm.describe()
    assert d["dropped"]["missing_image"] == 2
    kept = {dm.records_all[i].image for s in dm.splits.values() for i in s}
    assert "Hand_0000002.jpg" not in kept and len(kept) == d["train"] + d["val"]


def test_resized_cache_is_reused_and_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    root = write_fixture(tmp_path / "data", n_subjects=2, per_aspect=5)
    dm = Hands11kDataModule(cfg(), root)
    dm.prepare_data()
    first = dm.image_dir
    assert Image.open(first / "Hand_0000001.jpg").size == (32, 32)
    sample = dm.dataset("train", train=True)[0]
    assert sample["image"].shape == (3, 32, 32) and sample["mask"].shape == (1, 32, 32)
    assert 0.05 < float(sample["mask"].mean()) < 0.8  # the coloured patch on white is the silhouette
    dm2 = Hands11kDataModule(cfg(), root)
    dm2.prepare_data()
    assert dm2.image_dir == first
    Image.new("RGB", (16, 12), (10, 10, 10)).save(root / "Hands" / "Hand_0000001.jpg")
    dm3 = Hands11kDataModule(cfg(), root)
    dm3.prepare_data()
    assert dm3.image_dir != first and float(np.asarray(Image.open(dm3.image_dir / "Hand_0000001.jpg")).mean()) < 40


def test_demo_data_is_in_the_published_format(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DEMO_DIR", str(tmp_path))
    dm = Hands11kDataModule(cfg())
    raw = (dm.root / "HandInfo.csv").read_bytes()
    assert raw.startswith(",".join(COLUMNS).encode() + b"\r\n") and b'"0000007",' in raw
    d = dm.describe()
    assert d["subjects"] == 16 and d["dropped"]["accessories"] > 0 and all(d["val_per_aspect"].values())


def test_duplicated_image_name_is_an_error_naming_both_lines(tmp_path):
    # row 14 (line 15, subject 1) names the image of row 2 (line 3, subject 0): one file would be two people
    dup = lambda n, f: f[:7] + ['"Hand_0000002.jpg"'] + f[8:] if n == 14 else f  # noqa: E731
    root = write_fixture(tmp_path, n_subjects=3, per_aspect=2, images=False, mutate=dup)
    with pytest.raises(ZooError) as e:
        read_hand_info(root / "HandInfo.csv")
    msg = str(e.value)
    assert str(root / "HandInfo.csv") in msg and "'Hand_0000002.jpg'" in msg
    assert "line 3" in msg and "line 15" in msg and "\n" not in msg


def test_zero_byte_image_is_reported_and_skipped_unless_strict(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    root = write_fixture(tmp_path / "data", n_subjects=4, per_aspect=5)
    (root / "Hands" / "Hand_0000003.jpg").write_bytes(b"")
    dm = Hands11kDataModule(cfg(), root)
    with caplog.at_level("WARNING"):
        dm.prepare_data()  # builds the resized cache: the empty file must not stop it
    assert "Hand_0000003.jpg" in caplog.text and "empty file" in caplog.text
    kept = {dm.records_all[i].image for s in dm.splits.values() for i in s}
    assert "Hand_0000003.jpg" not in kept and "Hand_0000004.jpg" in kept
    assert dm.describe()["dropped"]["unreadable_image"] == 1
    with pytest.raises(ZooError, match=r"Hand_0000003.jpg \(empty file\).*strict_data"):
        Hands11kDataModule(cfg(strict_data=True), root).setup("fit")
