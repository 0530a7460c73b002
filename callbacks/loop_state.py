"""Checkpoints written between an epoch's last training step and its validation resume into that validation."""
from __future__ import annotations

import lightning as L


def defer_to_epoch_end_validation(trainer: L.Trainer, checkpoint: dict, *, crashing: bool = False) -> bool:
    """Rewrite `checkpoint["loops"]` when it is written after the epoch's last training batch but before the epoch's
    validation has finished: a step checkpoint saved in that batch's `on_train_batch_end`, or a crash checkpoint
    written during the validation. Returns True when it rewrote the state.

    Lightning resumes the first kind by starting a new epoch without validating or counting the finished one (a run
    of 3 epochs ends after 2), and the second by skipping the epoch's validation. The rewritten state is the one
    Lightning restores as "the epoch's batches are done, validation restarts from its first batch", so the resumed
    run validates, writes its epoch-end checkpoints and goes on exactly as the uninterrupted one.
    """
    if trainer.state.fn != "fit" or trainer.sanity_checking:
        return False
    fit = checkpoint.get("loops", {}).get("fit_loop")
    epoch_loop = trainer.fit_loop.epoch_loop
    if fit is None or not trainer.num_training_batches or trainer.num_training_batches == float("inf"):
        return False
    train_bp = epoch_loop.batch_progress
    if train_bp.current.processed < trainer.num_training_batches and not train_bp.is_last_batch:
        return False
    in_batch_end = train_bp.current.completed == train_bp.current.processed - 1
    if not (in_batch_end or (crashing and trainer.validating)):
        return False
    bp = fit["epoch_loop.batch_progress"]
    for part in ("total", "current"):
        bp[part]["completed"] = bp[part]["processed"]
    if epoch_loop._should_check_val_epoch():
        vp = fit["epoch_loop.val_loop.batch_progress"]
        for part in ("total", "current"):
            vp[part].update(ready=1, started=1, processed=0, completed=0)  # "restarted mid-evaluation" at batch 0
    return True


class EpochEndResume(L.Callback):
    """Applies `defer_to_epoch_end_validation` to every checkpoint the run writes."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        from callbacks.final_checkpoint import CrashCheckpoint

        crashing = any(getattr(cb, "_crashing", False) for cb in trainer.callbacks if isinstance(cb, CrashCheckpoint))
        defer_to_epoch_end_validation(trainer, checkpoint, crashing=crashing)
