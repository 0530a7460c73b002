"""datamodules.splits.seeded_split: one seeded split for face identities and palm images."""
from __future__ import annotations

import pytest

from datamodules.splits import seeded_split
from zoo.errors import ZooError


def test_same_seed_same_split_for_names_and_indices():
    names = [f"person_{i:02d}" for i in range(20)]
    by_name = seeded_split(names, (0.7, 0.15, 0.15), seed=7)
    by_index = seeded_split(range(20), (0.7, 0.15, 0.15), seed=7)
    assert by_name == seeded_split(list(names), (0.7, 0.15, 0.15), seed=7)  # reproducible
    assert {k: [names[i] for i in v] for k, v in by_index.items()} == by_name  # the same draw for any items
    assert [len(by_name[k]) for k in ("train", "val", "test")] == [14, 3, 3]
    assert sorted(sum(by_name.values(), [])) == names  # disjoint and complete
    assert by_name != seeded_split(names, (0.7, 0.15, 0.15), seed=8)
    assert all(v == sorted(v) for v in by_index.values())  # input order inside each part


def test_small_sets_and_bad_fractions():
    assert [len(v) for v in seeded_split(range(3), (0.8, 0.1, 0.1), 0).values()] == [1, 1, 1]
    assert [len(v) for v in seeded_split(range(3), (0.0, 0.5, 0.5), 0).values()] == [1, 2, 0]  # train keeps one
    assert seeded_split([], (0.8, 0.1, 0.1), 0) == {"train": [], "val": [], "test": []}
    with pytest.raises(ZooError, match=r"split=\(0.5, -0.1, 0.6\)"):
        seeded_split(range(5), (0.5, -0.1, 0.6), 0)
