"""P x K class-balanced batch sampler for metric learning: every batch holds K images of each of P distinct classes."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class PKBatchSampler:
    """Batches of P x K dataset indices: P distinct labels, K indices of each (so every image has K-1 positives).

    Plays the role of pytorch-metric-learning's `MPerClassSampler` (m = K) as a batch sampler that is seeded,
    resumable (`state_dict` / `load_state_dict`, used by torchdata's StatefulDataLoader) and reshuffled per epoch
    (`set_epoch`, called by Lightning). Labels are visited in a shuffled cycle so each appears about equally often;
    a label's indices are drawn in a shuffled cycle too, with repeats only when it has fewer than K of them.
    An epoch has `len(labels) // (P * K)` batches (at least one), i.e. about one pass over the data.

    Under data-parallel training each rank builds the same epoch (same seed) of `num_replicas` times its own batch
    count and takes every `num_replicas`-th batch from `rank`: the ranks together see one pass, without overlap.

    Args:
        labels: the label of each dataset index.
        batch_size: P * K; P = batch_size // K, capped at the number of labels.
        k: images per label in a batch (K >= 1).
        seed: base seed; the epoch is added to it.
        num_replicas, rank: the data-parallel world size and this process's rank (default: from
            `torch.distributed` when it is initialised, else 1 and 0).
    """

    def __init__(self, labels: Sequence[int], batch_size: int, k: int, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None):
        labels = np.asarray(labels)
        self.k = max(1, int(k))
        self.by_label = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        self.p = max(1, min(int(batch_size) // self.k, len(self.by_label)))
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            ready = dist.is_available() and dist.is_initialized()
            if num_replicas is None:
                num_replicas = dist.get_world_size() if ready else 1
            if rank is None:
                rank = dist.get_rank() if ready else 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.num_batches = max(1, len(labels) // (self.p * self.k * self.num_replicas))
        self.seed = int(seed)
        self.epoch = 0
        self._start = 0  # batches of the current epoch already yielded before a resume

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _epoch_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pools = [rng.permutation(ix) for ix in self.by_label]
        cursors = [0] * len(pools)
        label_queue: list[int] = []
        batches = []
        for _ in range(self.num_batches * self.num_replicas):
            chosen: list[int] = []
            while len(chosen) < self.p:
                if not label_queue:
                    label_queue = [int(c) for c in rng.permutation(len(pools))]
                c = label_queue.pop()
                if c in chosen:  # the queue wrapped mid-batch; keep labels distinct within a batch
                    label_queue.insert(0, c)
                    continue
                chosen.append(c)
            batch = []
            for c in chosen:
                pool = pools[c]
                for _ in range(self.k):
                    if cursors[c] >= len(pool):
                        pools[c] = pool = rng.permutation(pool)
                        cursors[c] = 0
                    batch.append(int(pool[cursors[c]]))
                    cursors[c] += 1
            batches.append(batch)
        return batches[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        batches = self._epoch_batches()
        for i in range(start, len(batches)):
            self._yielded = i + 1
            yield batches[i]
        self._yielded = 0

    # ----- resumable -----
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": getattr(self, "_yielded", 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self._start = int(state.get("yielded", 0))
