"""Stop a diverging run before it overwrites good checkpoints with non-finite weights."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from zoo.errors import ZooError


class DivergenceError(ZooError):
    """Training produced a non-finite loss or non-finite weights; no checkpoint was written with them."""


def nonfinite_tensors(state: dict[str, Any] | None) -> list[str]:
    """Names of the floating-point tensors in `state` holding a NaN or an infinity."""
    return [k for k, v in (state or {}).items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


class DivergenceGuard(L.Callback):
    """After every training step: the loss (and each logged `train/*` value) must be finite, and so must the weights;
    otherwise the run stops with a `DivergenceError` naming the step and the metric or tensors. Every checkpoint
    is checked before it is written (weights, EMA weights, raw weights under EMA): one holding non-finite values is
    refused, so the checkpoint written before the divergence stays as it was.

    Args:
        check_weights_every: check the weights every this many steps (the loss is checked every step); 0 = never.
    """

    def __init__(self, check_weights_every: int = 1):
        self.check_weights_every = int(check_weights_every)
        self.last_saved: tuple[Path, int] | None = None

    def _kept(self, trainer: L.Trainer) -> str:
        if self.last_saved is None:
            return "No checkpoint of this run had been written yet."
        path, step = self.last_saved
        return f"The last checkpoint written before it, {path} (step {step}), is unchanged."

    def _advice(self) -> str:
        return "Lower the learning rate (--lr or --set lr=...), or clip gradients (--set grad_clip=1.0), and start " \
               "again or --resume that checkpoint."

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        where = f"step {step} (epoch {trainer.current_epoch}, batch {batch_idx})"
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        # Only loss values mean divergence: an epoch-level metric computed before any update this process (e.g. a
        # torchmetrics MAE right after resuming at an epoch's end) is NaN without anything being wrong.
        bad = []
        for key, value in trainer.callback_metrics.items():
            if key.startswith("train") and "loss" in key and isinstance(value, torch.Tensor) and value.numel() == 1:
                v = float(value)
                if not math.isfinite(v):
                    bad.append(f"{key} = {v}")
        if isinstance(loss, torch.Tensor):
            if bool(torch.isfinite(loss.detach()).all()):
                bad = []  # the step's own loss is finite: a non-finite value above is a stale epoch aggregate
            elif not bad:
                bad.append(f"the training loss is {loss.detach().float().mean().item()}")
        if bad:
            raise DivergenceError(f"Training diverged at {where}: {'; '.join(bad)}. {self._kept(trainer)} "
                                  f"{self._advice()}")
        if self.check_weights_every and step % self.check_weights_every == 0:
            params = [p.detach() for p in pl_module.parameters() if p.is_floating_point()]
            if params and not bool(torch.isfinite(torch.stack(torch._foreach_norm(params, ord=float("inf")))).all()):
                names = [n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())]
                raise DivergenceError(f"Training diverged at {where}: the weights are no longer finite after the "
                                      f"optimizer step ({_names(names)}). {self._kept(trainer)} {self._advice()}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Parameters only: a buffer may hold NaN on purpose (e.g. the face task's "no best score yet").
        params = {n for n, _ in pl_module.named_parameters()}
        bad = [k for k in nonfinite_tensors(checkpoint.get("state_dict")) if k in params] + [
            f"{k} (raw weights)" for k in nonfinite_tensors(checkpoint.get("current_model_state")) if k in params]
        if bad:
            raise DivergenceError(f"Training diverged by step {trainer.global_step}: refusing to write a checkpoint "
                                  f"with non-finite weights ({_names(bad)}). {self._kept(trainer)} {self._advice()}")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._note_saved(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._note_saved(trainer)

    def _note_saved(self, trainer: L.Trainer) -> None:
        """Remember the newest checkpoint the run has written (checked before each step, so after any save)."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.last_model_path and Path(cb.last_model_path).exists():
                step = cb._last_global_step_saved
                if self.last_saved is None or step >= self.last_saved[1]:
                    self.last_saved = (Path(cb.last_model_path), step)
