"""Save and restore the random-number generators with each checkpoint, for bit-exact resumption."""
from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


class RNGStateCallback(L.Callback):
    """Stores Python's, NumPy's and torch's (CPU and CUDA) RNG states in checkpoints and restores them on resume.

    Together with the resumable loaders of `ZooDataModule`, a run resumed from a mid-epoch `last.ckpt` draws the same
    augmentations, dropout masks and MixToken boxes as the uninterrupted run.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        # Recorded after every completed step: a crash checkpoint taken while the next batch is in flight must not
        # include the random draws of that batch, which the resumed run will replay.
        self._recorded = self._capture()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._recorded = None

    def state_dict(self) -> dict[str, Any]:
        return getattr(self, "_recorded", None) or self._capture()

    @staticmethod
    def _capture() -> dict[str, Any]:
        # Plain types and tensors only, so checkpoints load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": list(random.getstate()[1]),
            "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restore late: the Trainer re-seeds and builds loaders between loading the checkpoint and the first batch.
        state = getattr(self, "_pending", None)
        if state is None:
            return
        random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        self._pending = None
