"""Samplers whose order is a pure function of (seed, epoch), so a resumed run sees exactly the same batches."""
from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Random permutation of `range(len(data))` drawn from `seed + epoch`.

    Lightning calls `set_epoch` at the start of every epoch (as for DistributedSampler). The iterator is stateful
    (epoch, position), so torchdata's StatefulDataLoader restores it mid-epoch with the right permutation whatever
    epoch the new process believes it is in. A shared torch.Generator would not do: its state also depends on how many
    iterators (and worker seeds) this process has drawn.
    """

    def __init__(self, data: Sized, seed: int = 0):
        self.data, self.seed, self.epoch = data, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=g).tolist()

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
