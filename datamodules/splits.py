"""The seeded train / val / test split of a data set's items (identities of a face folder, images of a palm folder)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from zoo.errors import ZooError

T = TypeVar("T")


def seeded_split(items: Sequence[T], fractions: tuple[float, float, float], seed: int) -> dict[str, list[T]]:
    """Split `items` by (train, val, test) fractions with a seeded permutation: {"train", "val", "test": items in
    their input order}. The same items, fractions and seed give the same split on every machine.

    val and test get round(n * fraction / sum) items, at least one each when their fraction is positive and n >= 3;
    train gets the rest, and at least one item when n >= 1 (val, then test, give way). A ZooError names a bad `split`.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ZooError(f"--set split={tuple(fractions)}: expected three non-negative fractions (train, val, test), "
                       f"e.g. split=0.8,0.1,0.1.")
    n, total = len(items), sum(fractions)
    order = np.random.default_rng(seed).permutation(n).tolist()
    counts = [int(round(n * f / total)) if f > 0 else 0 for f in fractions[1:]]
    n_val, n_test = [max(c, 1) if f > 0 and n >= 3 else c for c, f in zip(counts, fractions[1:])]
    n_train = max(min(n, 1), n - n_val - n_test)
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:n_train + n_val + n_test]}
    return {k: [items[i] for i in sorted(v)] for k, v in parts.items()}
