"""Simulated crashes for resume tests."""
from __future__ import annotations

import lightning as L


class StopAt(L.Callback):
    """Simulates a killed run: raises once `global_step` reaches `step`, before that batch trains."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")
