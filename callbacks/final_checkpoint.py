"""last.ckpt that is never lost: written when fit ends at an unsaved step, and when a run crashes or is interrupted."""
from __future__ import annotations

import copy
import shlex
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint


def resume_command(ckpt_path: str | Path, model: str | None = None) -> str:
    """The command line that continues this run from `ckpt_path`: this process's own `train.py` command with
    `--resume` replaced (or `train.py --model <model> --resume <path>` when not run from train.py's command line)."""
    if not (sys.argv and sys.argv[0].endswith("train.py")):
        return " ".join(["python train.py", *(["--model", model] if model else []), "--resume",
                         shlex.quote(str(ckpt_path))])
    argv, out, skip = list(sys.argv[1:]), [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--resume", "--run-name"):
            skip = True
            continue
        if a.startswith(("--resume=", "--run-name=")):
            continue
        out.append(a)
    return " ".join(["python", shlex.quote(sys.argv[0]), *map(shlex.quote, out), "--resume",
                     shlex.quote(str(ckpt_path))])


class FinalCheckpoint(Checkpoint):
    """Saves `<dirpath>/last.ckpt` at the end of fit unless a ModelCheckpoint already saved that global step.

    A Lightning `Checkpoint`, so it runs after every other callback, those a module configures included (the EMA swap
    at the end of fit). A run that `--max-steps` stops mid-epoch is written with the loops' state taken right after
    its last step, as a periodic step checkpoint holds it: by the end of fit Lightning has closed the epoch, and a file
    with that state would resume at the next epoch and skip the rest of this one."""

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self._open_epoch: dict | None = None  # loops state and epoch after a mid-epoch --max-steps stop
        self._writing = False  # our own save is in progress (on_save_checkpoint sees every callback's saves)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.max_steps < 0:
            return
        if trainer.global_step >= trainer.max_steps and batch_idx + 1 < trainer.num_training_batches:
            loops = trainer._checkpoint_connector._get_loops_state_dict()
            self._open_epoch = {"loops": copy.deepcopy(loops), "epoch": trainer.current_epoch}
            for cb in trainer.checkpoint_callbacks:  # their `last` at the end of fit would close the epoch: ours instead
                if isinstance(cb, ModelCheckpoint) and cb.save_last:
                    cb._last_checkpoint_saved = cb.last_model_path = str(self.dirpath / "last.ckpt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        saved = [cb._last_global_step_saved for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        if self._open_epoch is not None or trainer.global_step not in saved:
            self._writing = True
            try:
                trainer.save_checkpoint(self.dirpath / "last.ckpt", weights_only=False)
            finally:
                self._writing = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._writing and self._open_epoch is not None:
            checkpoint["loops"] = self._open_epoch["loops"]
            checkpoint["epoch"] = self._open_epoch["epoch"]


class CrashCheckpoint(L.Callback):
    """Writes last.ckpt on any exception, Ctrl-C or SIGTERM (then prints the command that resumes it).

    Not Lightning's OnExceptionCheckpoint: that one deletes its file on a normal teardown (which would remove the run's
    last.ckpt), and its mere presence makes `fit(ckpt_path=None)` silently resume from "last". A crash usually comes while a batch is in flight: the loader has already
    yielded it but the weights do not include it yet. The loader position saved is therefore the one recorded after
    the last completed step, so the resumed run replays that batch and reaches the same global step as planned.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last", model: str | None = None):
        self.ckpt_path = Path(dirpath) / f"{filename}.ckpt"
        self.model = model
        self._loader_states = None
        self._crashing = False

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        loader = trainer.fit_loop._combined_loader
        self._loader_states = loader._state_dicts() if loader is not None else None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from callbacks.divergence import DivergenceError

        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if isinstance(exception, DivergenceError):  # the weights are not worth keeping; the last good file stays
            return
        stop = ("interrupted (SIGINT, Ctrl-C)" if isinstance(exception, KeyboardInterrupt) else
                "stopped by SIGTERM" if isinstance(exception, SIGTERMException) else None)
        if trainer.global_step == 0:  # nothing trained yet: nothing worth resuming (and no folder left behind)
            if stop and trainer.is_global_zero:
                print(f"\n[train] {stop} before the first step; no checkpoint written.", file=sys.stderr, flush=True)
            return
        self._crashing = True
        try:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        except DivergenceError as e:  # non-finite weights found while saving: keep the previous file
            print(f"[train] no checkpoint written on {type(exception).__name__}: {e}", file=sys.stderr)
            return
        finally:
            self._crashing = False
        if stop and trainer.is_global_zero:
            print(f"\n[train] {stop} at step {trainer.global_step} (epoch {trainer.current_epoch}); checkpoint saved "
                  f"to {self.ckpt_path}. Resume with:\n  {resume_command(self.ckpt_path, self.model)}", file=sys.stderr,
                  flush=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict")
        if self._crashing and self._loader_states and fit_state is not None:
            fit_state["combined_loader"] = self._loader_states

