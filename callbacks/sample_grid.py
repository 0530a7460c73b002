"""A grid of generated samples every K optimizer steps, written to the run folder (PNG) and to W&B.

Generic: the task passes a `sample_fn(n) -> (n, 3, H, W)` images function (float in [0, 1] or uint8), e.g. its EMA
sampler; the callback knows no model.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] or uint8 -> one (rows * (H + p) + p, cols * (W + p) + p, 3) uint8 image, row-major,
    `nrow` images per row (default: a square-ish grid), `padding` black pixels between tiles."""
    from torchvision.utils import make_grid

    x = images.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    nrow = nrow or max(1, math.ceil(math.sqrt(len(x))))
    grid = make_grid(x.clamp(0, 1), nrow=nrow, padding=padding)
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


class SampleGridCallback(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end of training): `sample_fn(n_samples)` as a PNG grid,
    `<run dir>/samples/step-<step>.png`, and as the image `samples` of the W&B run when the trainer logs there.

    Args:
        sample_fn: n -> (n, 3, H, W) images in [0, 1] (float) or uint8; called under torch.no_grad on rank 0.
        every_n_steps: interval in optimizer steps (> 0); n_samples: images per grid.
    """

    def __init__(self, sample_fn: Callable[[int], Tensor], every_n_steps: int = 500, n_samples: int = 16,
                 key: str = "samples"):
        if every_n_steps <= 0:
            raise ValueError("every_n_steps must be positive")
        self.sample_fn, self.every_n_steps, self.n_samples, self.key = sample_fn, every_n_steps, n_samples, key
        self._last_step = -1
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.write(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step > 0 and trainer.global_step != self._last_step:
            self.write(trainer, trainer.global_step)

    def write(self, trainer: L.Trainer, step: int) -> Path | None:
        self._last_step = step
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return None
        with torch.no_grad():
            images = self.sample_fn(self.n_samples)
        path = Path(trainer.default_root_dir) / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(images)).save(path)
        self.written.append(path)
        self._log_wandb(trainer, path, step)
        return path

    def _log_wandb(self, trainer: L.Trainer, path: Path, step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=self.key, images=[str(path)], step=step, caption=[f"step {step}"])
