"""EMA of the weights with Lightning's `EMAWeightAveraging`, plus access to the raw weights during validation.

Lightning's callback keeps an `AveragedModel` copy, swaps the EMA weights in for validation, writes the EMA weights to
checkpoint["state_dict"] (so `Module.load_from_checkpoint(path)` gives the EMA model) and the raw ones to
checkpoint["current_model_state"], and restores both on resume. This subclass adds:

- `warmup`: decay_t = min(decay, (1 + t) / (10 + t)) after t updates (timm's ModelEmaV3 warm-up), so short runs
  (the CPU demo) get a useful average instead of one dominated by the initial weights;
- `raw_module(pl_module)`: the module that holds the raw weights while the EMA weights are swapped in (validation), so
  a task can report metrics for both.
- tied parameters (two Parameters over one tensor) are swapped once, not twice;
- at the end of fit the EMA and raw weights are swapped rather than copied, so a last.ckpt written then still holds
  both and `--resume` continues the raw weights exactly.
"""
from __future__ import annotations

import itertools

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


def ema_avg_fn(decay: float, warmup: bool):
    """avg_fn(ema, current, num_averaged) for `torch.optim.swa_utils.AveragedModel`."""

    @torch.no_grad()
    def update(ema: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = decay
        if warmup:
            t = float(num_averaged)
            d = min(decay, (1.0 + t) / (10.0 + t))
        return ema * d + current * (1.0 - d)

    return update


class EMA(EMAWeightAveraging):
    """Exponential moving average of every parameter and buffer (BN statistics included), updated per optimizer step.

    Args:
        decay: the EMA decay per optimizer step (0.9999 published; 0.99 for the short CPU demo).
        warmup: ramp the decay up as (1 + t) / (10 + t) until it reaches `decay`.
        device: where the average lives (default: with the model).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, device: torch.device | str | None = None):
        super().__init__(device=device, use_buffers=True, decay=decay)
        self.decay, self.warmup = decay, warmup
        self._kwargs["avg_fn"] = ema_avg_fn(decay, warmup)
        self._swapped = False

    @property
    def state_key(self) -> str:
        return "EMA"

    def raw_module(self) -> L.LightningModule | None:
        """While the EMA weights are swapped into the trained module (validation during fit, and after fit): the copy
        holding the raw weights. None otherwise (no EMA copy yet, or during training steps)."""
        if self._average_model is None or not self._swapped:
            return None
        return self._average_model.module

    # Lightning copies the EMA into the module at the end of fit, so a last.ckpt written after that (ModelCheckpoint
    # saves `last` in on_train_end) would hold the EMA twice and a resumed run would lose the raw weights. We swap
    # instead, and write checkpoints from whichever side holds which weights.
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and not self._swapped:
            self._swap_models(pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped_for_validation = self._average_model is not None and not self._swapped
        if self._swapped_for_validation:
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_swapped_for_validation", False):
            self._swap_models(pl_module)
            self._swapped_for_validation = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._average_model is None or not self._swapped:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        # The module holds the EMA weights (so checkpoint["state_dict"] has them); the raw ones are in the copy.
        held = self._average_model.state_dict()
        checkpoint["current_model_state"] = {k[len("module."):]: v for k, v in held.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in held.items() if not k.startswith("module.")}

    def _swap_models(self, pl_module: L.LightningModule) -> None:
        assert self._average_model is not None
        average = itertools.chain(self._average_model.module.parameters(), self._average_model.module.buffers())
        current = itertools.chain(pl_module.parameters(), pl_module.buffers())
        seen: set[int] = set()
        for avg, cur in zip(average, current, strict=True):
            if cur.data_ptr() in seen:  # a tied tensor already swapped through its other Parameter
                continue
            seen.add(cur.data_ptr())
            tmp = avg.data.clone()
            avg.data.copy_(cur.data)
            cur.data.copy_(tmp)
        self._swapped = not self._swapped
