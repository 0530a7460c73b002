"""A rich progress bar that fits one line per epoch in an 80-column terminal."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class CompactRichProgressBar(RichProgressBar):
    """Lightning's rich bar showing only the training loss and the checkpoint monitor, in 4 significant digits, with
    short names (`loss`, `val/top1`): with every logged metric the text wraps, one metric per line, in 80 columns.

    Args:
        monitor: the metric best-k checkpoints follow (shown when logged).
        **kwargs: RichProgressBar's (e.g. leave=True).
    """

    def __init__(self, monitor: str = "val/loss", **kwargs: Any):
        super().__init__(**kwargs)
        self.monitor = monitor

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        shown: dict[str, Any] = {}
        for key in ("train/loss_step", "train/loss", "train/loss_epoch"):
            if key in items:
                shown["loss"] = items[key]
                break
        if self.monitor in items:
            shown[self.monitor] = items[self.monitor]
        return {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()}
