"""Resume after a run stopped mid-epoch continues at the right step with weights identical to an uninterrupted run."""
from __future__ import annotations

import pytest
import torch
from crash import StopAt

import train
from zoo.checkpoint import read_checkpoint


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_mid_epoch_matches_uninterrupted(toy_registered, tmp_path, monkeypatch):
    # 96 training items / batch 8 = 12 steps per epoch; 2 epochs; the run dies at step 17 (mid second epoch).
    # A SIGKILLed process runs no exception handler: only the periodic last.ckpt (every step here) survives.
    from callbacks.final_checkpoint import CrashCheckpoint

    common = ["--model", "toy", "--logger", "none", "--progress", "none", "--deterministic", "--ckpt-every-n-steps", "1"]
    full = train.run(common + ["--run-name", "full"])
    assert full["trainer"].global_step == 24

    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="simulated crash"):
        m.setattr(CrashCheckpoint, "on_exception", lambda *a, **k: None)
        train.run(common + ["--run-name", "crashed"], extra_callbacks=[StopAt(17)])
    last = full["run_dir"].parent / "crashed" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 17

    resumed = train.run(common + ["--resume", str(last)])
    assert resumed["run_dir"] == last.parent
    assert resumed["trainer"].global_step == 24
    a, b = _weights(full["model"]), _weights(resumed["model"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"weight {k} differs after resume")


def test_resume_last_picks_newest_run(toy_registered):
    common = ["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "3"]
    train.run(common + ["--run-name", "a"])
    out = train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "5", "--resume", "last"])
    assert out["run_dir"].name == "a" and out["trainer"].global_step == 5


def test_crash_saves_last_checkpoint_and_resume_finishes(toy_registered):
    """An exception (or Ctrl-C) mid-epoch writes last.ckpt at that step; --resume last replays the in-flight batch
    and ends at the planned step with the same weights as an uninterrupted run."""
    common = ["--model", "toy", "--logger", "none", "--progress", "none", "--deterministic"]
    full = train.run(common + ["--run-name", "full"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(common + ["--run-name", "c"], extra_callbacks=[StopAt(7)])
    last = toy_registered / "checkpoints" / "toy" / "c" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 7
    out = train.run(common + ["--resume", "last"])
    assert out["trainer"].global_step == 24 and out["trainer"].current_epoch == 2
    a, b = _weights(full["model"]), _weights(out["model"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"weight {k} differs after crash resume")
