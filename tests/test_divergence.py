"""A diverging run stops with an error naming the step and the metric, and never overwrites a checkpoint with
non-finite weights."""
from __future__ import annotations

import hashlib

import lightning as L
import pytest
import torch

import model_config
import train
from zoo.checkpoint import read_checkpoint

READY = [name for name, e in model_config.REGISTRY.items() if e.status == "ready"]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class PoisonAt(L.Callback):
    """Before the batch of `global_step == step` trains, records last.ckpt's digest and sets one weight to NaN (as a
    diverged optimizer step would); `where="validation"` poisons when the epoch-end validation starts instead."""

    def __init__(self, step: int, where: str = "batch"):
        self.step, self.where, self.digest, self.done = step, where, None, False

    def _poison(self, trainer, pl_module):
        if self.done or trainer.global_step < self.step or trainer.sanity_checking:
            return
        self.done = True
        last = trainer.default_root_dir and __import__("pathlib").Path(trainer.default_root_dir) / "last.ckpt"
        self.digest = _digest(last) if last.exists() else None
        with torch.no_grad():
            next(p for p in pl_module.parameters() if p.is_floating_point() and p.requires_grad).fill_(float("nan"))

    def on_train_batch_start(self, trainer, pl_module, *args):
        if self.where == "batch":
            self._poison(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        if self.where == "validation" and trainer.state.fn == "fit":
            self._poison(trainer, pl_module)


def _main(argv, callbacks, capsys):
    code = None
    try:
        train.run(argv, extra_callbacks=callbacks)
    except train.ZooError as e:
        code, message = 2, str(e)
    else:
        code, message = 0, ""
    return code, message


@pytest.mark.parametrize("task", READY)
def test_task_divergence_stops_and_keeps_last_good_checkpoint(task, tmp_path, monkeypatch, capsys):
    import zoo.trainer

    monkeypatch.setattr(zoo.trainer, "CHECKPOINT_ROOT", tmp_path)
    poison = PoisonAt(2)
    code, message = _main(["--model", task, "--preset", "micro", "--logger", "none", "--progress", "none",
                           "--epochs", "1", "--batch-size", "4", "--limit-train-batches", "4",
                           "--limit-val-batches", "1", "--num-workers", "0", "--ckpt-every-n-steps", "1",
                           "--set", "image_size=32", "--run-name", "r"], [poison], capsys)
    assert code == 2
    assert "diverged at step 3" in message and "nan" in message.lower(), message
    last = tmp_path / task / "r" / "last.ckpt"
    assert f"{last} (step 2), is unchanged" in message, message
    assert _digest(last) == poison.digest  # untouched by the failing run
    ck = read_checkpoint(last)
    assert ck["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    assert not list((tmp_path / task / "r").glob("best-*.ckpt"))


def test_lr_1e6_exits_non_zero_and_keeps_good_checkpoint(toy_registered, capsys):
    """The issue's repro on the toy task: --set lr=1e6 used to end with exit 0 and NaN checkpoints."""
    code = train.main(["--model", "toy", "--logger", "none", "--progress", "none", "--ckpt-every-n-steps", "1",
                       "--set", "lr=1e6", "--run-name", "r"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Training diverged at step" in err and "train/loss = nan" in err, err
    assert "Traceback" not in err
    for path in (toy_registered / "checkpoints" / "toy" / "r").glob("*.ckpt"):
        ck = read_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in ck["state_dict"].values()), path


def test_checkpoint_with_nonfinite_weights_is_never_written(toy_registered):
    """Weights that turn NaN outside a training step (here: when the epoch-end validation starts) are caught by the
    checkpoint save path: the epoch-end checkpoint is refused and last.ckpt keeps the step checkpoint before it."""
    poison = PoisonAt(12, where="validation")
    with pytest.raises(train.ZooError, match="refusing to write a checkpoint with non-finite weights"):
        train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--ckpt-every-n-steps", "5",
                   "--run-name", "r"], extra_callbacks=[poison])
    last = toy_registered / "checkpoints" / "toy" / "r" / "last.ckpt"
    assert _digest(last) == poison.digest
    assert read_checkpoint(last)["global_step"] == 10
