"""LFW data: both layouts, the identity-disjoint split, the P x K sampler, pairs.txt parsing and the k-fold protocol."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datamodules.lfw import LFWDataModule, detect_layout, write_pairs_file
from datamodules.lfw_pairs import load_pairs, read_pairs
from datamodules.pk_sampler import PKBatchSampler
from datamodules.splits import seeded_split
from model_config import FaceConfig
from zoo.errors import ZooError
from zoo.images import save_rgb
from zoo.verification import best_threshold, kfold_verification


def write_people(root: Path, counts: dict[str, int], ext: str = ".jpg", size: int = 16) -> None:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        for i in range(1, n + 1):
            save_rgb(root / name / f"{name}_{i:04d}{ext}", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def cfg(**kw) -> FaceConfig:
    return FaceConfig.from_presets("micro").replace(num_workers=0, image_size=16, batch_size=8, **kw)


COUNTS = {f"Person_{c}": n for c, n in zip("ABCDEFGHIJKLMNOPQRST", [4, 3, 1, 5, 2, 2, 6, 1, 3, 4] * 2)}


def test_people_layout_with_wrapper_folder_split_is_identity_disjoint_and_seeded(tmp_path):
    write_people(tmp_path / "lfw-deepfunneled", COUNTS)
    write_people(tmp_path / "lfw-deepfunneled", {"Upper_Case": 2}, ext=".PNG")
    dm = LFWDataModule(cfg(min_images_per_person=2), data_dir=tmp_path)
    dm.setup("fit")
    assert dm.layout.kind == "people" and dm.layout.root.name == "lfw-deepfunneled"
    splits = {s: set(p) for s, p in dm.people.items()}
    assert not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"]) \
        and not (splits["val"] & splits["test"])
    everyone = set().union(*splits.values())
    assert everyone == {n for n, c in COUNTS.items() if c >= 2} | {"Upper_Case"}  # single-image people filtered
    assert len(splits["val"]) >= 1 and len(splits["test"]) >= 1
    assert dm.config_overrides() == {"num_identities": len(splits["train"])}
    again = LFWDataModule(cfg(min_images_per_person=2), data_dir=tmp_path)
    again.setup("fit")
    assert again.people == dm.people  # same seed, same split
    other = seeded_split(sorted(everyone), (0.7, 0.15, 0.15), seed=7)
    assert sorted(sum(other.values(), [])) == sorted(everyone)


def test_presplit_layout_is_used_as_given(tmp_path):
    for split, names in {"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["f"]}.items():
        write_people(tmp_path / split, {n: 3 for n in names}, ext=".jpeg")
    dm = LFWDataModule(cfg(), data_dir=tmp_path)
    dm.setup("fit")
    assert dm.layout.kind == "split"
    assert {s: sorted(p) for s, p in dm.people.items()} == {"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["f"]}
    images, labels = next(iter(dm.val_dataloader()[0]))
    assert images.shape[1:] == (3, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_wrong_layout_says_what_was_expected(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ZooError, match="Expected an LFW people folder"):
        detect_layout(tmp_path)


def test_pk_sampler_gives_k_images_of_p_identities_and_resumes():
    labels = [c for c, n in enumerate([5, 2, 3, 7, 2, 4, 1]) for _ in range(n)]
    sampler = PKBatchSampler(labels, batch_size=8, k=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 8
    for batch in batches:
        per_label = Counter(labels[i] for i in batch)
        assert len(per_label) == 4 and set(per_label.values()) == {2}
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled per epoch
    it = iter(sampler)
    first = next(it)
    state = sampler.state_dict()
    resumed = PKBatchSampler(labels, batch_size=8, k=2, seed=3)
    resumed.load_state_dict(state)
    assert [first, *list(resumed)] == [first, *list(it)]


def test_training_batches_are_p_by_k(tmp_path):
    write_people(tmp_path, COUNTS)
    dm = LFWDataModule(cfg(split=(1.0, 0.0, 0.0), m_per_class=2), data_dir=tmp_path)
    dm.people = {}
    with pytest.raises(ZooError, match="no validation identities"):
        dm.setup("fit")
    dm = LFWDataModule(cfg(split=(0.8, 0.2, 0.0), m_per_class=2), data_dir=tmp_path)
    dm.setup("fit")
    _, labels = next(iter(dm.train_dataloader()))
    assert sorted(Counter(labels.tolist()).values()) == [2, 2, 2, 2]


# ----- pairs.txt -----
PAIRS = """2\t2
Person_A\t1\t2
Person_B\t1\t3
Person_A\t1\tPerson_B\t2
Person_C\t1\tPerson_A\t3
Person_C\t1\t2
Person_A\t3\t4
Person_B\t2\tPerson_C\t2
Person_A\t4\tPerson_C\t1
"""


def test_pairs_file_in_lfw_format(tmp_path):
    write_people(tmp_path, {"Person_A": 4, "Person_B": 3, "Person_C": 2})
    (tmp_path / "pairs.txt").write_text(PAIRS)
    pairs = read_pairs(tmp_path / "pairs.txt", tmp_path)
    assert [p.same for p in pairs] == [True, True, False, False] * 2
    assert [p.fold for p in pairs] == [0] * 4 + [1] * 4
    assert pairs[3].a == tmp_path / "Person_C" / "Person_C_0001.jpg"
    assert pairs[3].b == tmp_path / "Person_A" / "Person_A_0003.jpg"
    assert pairs[5].line_no == 7
    assert detect_layout(tmp_path).pairs_file == tmp_path / "pairs.txt"


def test_pairs_naming_missing_images_are_skipped_and_counted(tmp_path):
    write_people(tmp_path, {"Person_A": 4, "Person_B": 3, "Person_C": 2})
    (tmp_path / "pairs.txt").write_text(PAIRS.replace("Person_C\t1\t2", "Person_C\t1\t9"))
    pair_set = load_pairs(tmp_path / "pairs.txt", tmp_path)
    assert (len(pair_set.scored), pair_set.total, len(pair_set.skipped)) == (7, 8, 1)
    assert pair_set.skipped[0].line_no == 6
    assert "7 of 8 pairs scored (1 skipped" in pair_set.note and "line 6" in pair_set.note
    (tmp_path / "pairs.txt").write_text(PAIRS.replace("Person_", "Nobody_"))
    with pytest.raises(ZooError, match=r"none of its 8 pairs.*line 2 'Nobody_A\s1\s2'.*Nobody_A_0001.jpg not found"):
        load_pairs(tmp_path / "pairs.txt", tmp_path)
    (tmp_path / "pairs.txt").write_text("10 300\nPerson_A 1 2\n")
    with pytest.raises(ZooError, match="6000 lines"):
        read_pairs(tmp_path / "pairs.txt", tmp_path)


def test_written_pairs_file_round_trips(tmp_path):
    counts = {"Ann_X": 3, "Bob_Y": 2, "Cy_Z": 1}
    write_people(tmp_path, counts)
    write_pairs_file(tmp_path / "pairs.txt", counts, folds=3, per_fold=4)
    assert (tmp_path / "pairs.txt").read_text().splitlines()[0] == "3\t4"
    assert len(read_pairs(tmp_path / "pairs.txt", tmp_path)) == 24


def test_best_threshold_hand_example():
    scores = np.array([0.9, 0.8, 0.6, 0.55, 0.3, 0.1])
    same = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    thr, acc = best_threshold(scores, same)
    assert acc == pytest.approx(5 / 6)  # cut after 0.8 (or after 0.55): one mistake
    assert thr in (pytest.approx(0.7), pytest.approx(0.425))


def test_kfold_threshold_comes_from_the_other_folds():
    # Fold 0 alone would pick a threshold near 0.5; folds 1 and 2 (the others) put it between 0.7 and 0.8,
    # so fold 0's pair with score 0.6 is called "different" and counted wrong.
    scores = np.array([0.6, 0.2, 0.9, 0.7, 0.85, 0.75])
    same = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    folds = np.array([0, 0, 1, 1, 2, 2])
    res = kfold_verification(scores, same, folds)
    assert res.accuracies == [0.5, 1.0, 1.0]
    assert 0.75 < res.thresholds[0] < 0.85
    assert res.auc == pytest.approx(7 / 9)  # 2 of the 9 positive-negative orderings are inverted (0.6 < 0.7, 0.75)
    assert "mean" in res.table()
