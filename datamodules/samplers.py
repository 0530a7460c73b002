"""Samplers whose order, and each item's augmentation seed, are pure functions of (seed, epoch), so a resumed run
sees exactly the same batches, augmented the same way, whatever the number of loader workers."""
from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


def data_parallel_rank() -> tuple[int, int]:
    """(world size, rank) of `torch.distributed` when it is initialised (under DDP), else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of `range(len(data))` drawn from `seed + epoch`; under DDP (`num_replicas` > 1) every rank
    draws the same permutation, padded with its first items to a multiple of `num_replicas`, and takes every
    `num_replicas`-th item from `rank` (as torch's DistributedSampler does).

    Lightning calls `set_epoch` at the start of every epoch (as for DistributedSampler). The iterator is stateful
    (epoch, position), so torchdata's StatefulDataLoader restores it mid-epoch with the right permutation whatever
    epoch the new process believes it is in. A shared torch.Generator would not do: its state also depends on how many
    iterators (and worker seeds) this process has drawn.
    """

    def __init__(self, data: Sized, seed: int = 0, num_replicas: int | None = None, rank: int | None = None):
        self.data, self.seed, self.epoch = data, int(seed), 0
        world, here = data_parallel_rank()
        self.num_replicas = int(world if num_replicas is None else num_replicas)
        self.rank = int(here if rank is None else rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-len(self.data) // self.num_replicas)

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.data), generator=g).tolist()
        if self.num_replicas == 1:
            return perm
        perm += perm[:len(self) * self.num_replicas - len(perm)]
        return perm[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return _EpochShuffleIterator(self)


class _EpochShuffleIterator(Iterator[int]):
    def __init__(self, sampler: EpochShuffleSampler):
        self.sampler = sampler
        self.epoch: int | None = None  # read lazily: Lightning may call set_epoch after iter()
        self.yielded = 0
        self._perm: list[int] | None = None

    def __next__(self) -> int:
        if self._perm is None:
            if self.epoch is None:
                self.epoch = self.sampler.epoch
            self._perm = self.sampler.permutation(self.epoch)
        if self.yielded >= len(self._perm):
            raise StopIteration
        self.yielded += 1
        return self._perm[self.yielded - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.sampler.epoch if self.epoch is None else self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.yielded, self._perm = int(state["epoch"]), int(state["yielded"]), None
        self.sampler.epoch = self.epoch


class RankShardSampler(Sampler[int]):
    """Evaluation order under DDP: rank r reads the r-th contiguous block of `range(n)`, without padding, so
    concatenating what the ranks gathered in rank order gives back every item once, in the single-process order.

    Args:
        n: dataset length.
        num_replicas, rank: default from `torch.distributed` (see `data_parallel_rank`).
    """

    def __init__(self, n: int, num_replicas: int | None = None, rank: int | None = None):
        world, here = data_parallel_rank()
        world = int(world if num_replicas is None else num_replicas)
        here = int(here if rank is None else rank)
        per = -(-int(n) // world)
        self.start, self.stop = min(n, here * per), min(n, (here + 1) * per)

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))


# ----- per-item augmentation seeds -----
_MASK64 = (1 << 64) - 1


def item_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the `position`-th item drawn in `epoch` (splitmix64 of the three numbers)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(position) + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class SeededSampler:
    """Wraps a sampler (yielding indices) or a batch sampler (yielding lists of indices) so that each index comes with
    the seed its item's augmentation draws from: `(index, item_seed(seed, epoch, position))`.

    Data-loader workers draw augmentations from their own RNGs, seeded once when the worker starts and never saved, so
    a resumed run (fresh workers) or a different worker count would draw different crops and flips. With the seed
    travelling beside the index (and `SeededItems` seeding the RNGs before each item), an item's augmentation is a
    pure function of (seed, epoch, position in the epoch): the same in every process, with any number of workers.
    `set_epoch`, `__len__` and the resumable state are those of the wrapped sampler plus the position.
    """

    def __init__(self, inner, seed: int = 0):
        self.inner, self.seed, self.epoch = inner, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if callable(getattr(self.inner, "set_epoch", None)):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator:
        return _SeededIterator(self)

    # Samplers whose state lives on the sampler (PKBatchSampler) rather than on their iterator.
    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict() if callable(getattr(self.inner, "state_dict", None)) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and callable(getattr(self.inner, "load_state_dict", None)):
            self.inner.load_state_dict(state)


class _SeededIterator(Iterator):
    def __init__(self, sampler: SeededSampler):
        self.sampler = sampler
        self.epoch: int | None = None  # read at the first item: Lightning may call set_epoch after iter()
        self.position = 0
        self._inner: Iterator | None = None
        self._inner_state: dict[str, Any] | None = None

    def _inner_iter(self) -> Iterator:
        if self._inner is None:
            self._inner = iter(self.sampler.inner)
            if self._inner_state is not None and callable(getattr(self._inner, "load_state_dict", None)):
                self._inner.load_state_dict(self._inner_state)
        return self._inner

    def __next__(self):
        it = self._inner_iter()
        if self.epoch is None:
            self.epoch = self.sampler.epoch
        item = next(it)
        seed, epoch = self.sampler.seed, self.epoch
        if isinstance(item, (list, tuple)):
            out = [(int(i), item_seed(seed, epoch, self.position + j)) for j, i in enumerate(item)]
            self.position += len(out)
            return out
        self.position += 1
        return int(item), item_seed(seed, epoch, self.position - 1)

    def state_dict(self) -> dict[str, Any]:
        inner = self._inner.state_dict() if callable(getattr(self._inner, "state_dict", None)) else None
        return {"epoch": self.sampler.epoch if self.epoch is None else self.epoch, "position": self.position,
                "inner": inner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.sampler.set_epoch(self.epoch)
        self._inner, self._inner_state = None, state.get("inner")


class SeededItems(torch.utils.data.Dataset):
    """`dataset[i]` for an `(i, seed)` item from `SeededSampler`, with Python's, NumPy's and torch's global RNGs seeded
    from `seed` while the item is built (restored afterwards in the main process; worker processes need no restore).
    A plain index is passed through unchanged. Attributes of the wrapped dataset are reachable through this one."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, seed = item
        # Albumentations (2.x) draws from its own generators, not the global ones: seed them too.
        transform = getattr(self.dataset, "transform", None)
        if callable(getattr(transform, "set_random_seed", None)):
            transform.set_random_seed(seed % 2**32)
        if torch.utils.data.get_worker_info() is not None:
            _seed_all(seed)
            return self.dataset[index]
        py, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            _seed_all(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py)
                np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)
