"""Resume is exact with loader workers, from a checkpoint taken mid-epoch or at an epoch's last step, after a kill
(only the periodic step checkpoint survives) or a Ctrl-C (the crash checkpoint is written).

Kills are simulated in-process for every registered task (a raised exception with the crash checkpoint disabled is
what SIGKILL leaves on disk; a KeyboardInterrupt goes through Lightning's Ctrl-C path), and sent as real signals to a
`train.py` subprocess for the toy task.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from crash import InterruptAt, raise_

import model_config
import train
from zoo.checkpoint import read_checkpoint

READY = [name for name, e in model_config.REGISTRY.items() if e.status == "ready"]
ROOT = Path(__file__).resolve().parent.parent


def _state(out) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in out["model"].state_dict().items()}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)}/{len(a)} tensors differ after resume, e.g. {differ[:3]}"


def _crash_and_resume(common, name, step, at, kind, monkeypatch, ckpt_root):
    """Run until the simulated kill / Ctrl-C, keep a copy of the checkpoint it left, resume it to the end."""
    from callbacks.final_checkpoint import CrashCheckpoint

    with monkeypatch.context() as m:
        if kind == "kill":  # SIGKILL runs no handler: only the periodic step checkpoint is on disk
            m.setattr(CrashCheckpoint, "on_exception", lambda *a, **k: None)
            with pytest.raises(RuntimeError, match="simulated crash"):
                train.run(common + ["--run-name", name], extra_callbacks=[InterruptAt(step, raise_(RuntimeError), at)])
        else:  # Ctrl-C: Lightning catches the KeyboardInterrupt, our crash checkpoint writes last.ckpt, exit 130
            with pytest.raises(SystemExit):
                train.run(common + ["--run-name", name],
                          extra_callbacks=[InterruptAt(step, raise_(KeyboardInterrupt), at)])
    last = ckpt_root / name / "last.ckpt"
    saved = read_checkpoint(last)
    return train.run(common + ["--resume", str(last)]), saved


# 4 training batches of 2 per epoch, 2 epochs, one validation batch, a step checkpoint every 2 steps, 2 loader workers.
TASK_ARGS = ["--logger", "none", "--progress", "none", "--preset", "micro", "--epochs", "2", "--batch-size", "2",
             "--limit-train-batches", "4", "--limit-val-batches", "1", "--num-workers", "2",
             "--ckpt-every-n-steps", "2"]
# 32 px keeps every task's micro network at a few tokens (palm's micro preset is 32 px already).
SMALL_IMAGES = ["--set", "image_size=32"]


def _cheap(task: str) -> list[str]:
    """No sample grid (palm's end-of-training DDIM grid was half the test's time; it reads the weights, never
    changes them, and has its own tests)."""
    cfg = model_config.REGISTRY[task].config.from_presets("micro")
    return ["--set", "grid_every_n_steps=0"] if hasattr(cfg, "grid_every_n_steps") else []


@pytest.mark.slow  # every task's state; the toy task's cases below test the mechanism in the inner loop
@pytest.mark.parametrize("task", READY)
def test_task_resume_exact_with_workers(task, tmp_path, monkeypatch, one_thread):
    """Per task: Ctrl-C before step 3's batch trains (mid-epoch, the batch already fetched by the workers); that run
    resumed, then killed right after the step checkpoint of the epoch's last step (step 4, before its validation);
    resumed again to the end: the weights equal an uninterrupted run's (a chain, so 4 runs test both kinds)."""
    import zoo.trainer

    monkeypatch.setattr(zoo.trainer, "CHECKPOINT_ROOT", tmp_path)
    common = ["--model", task, *TASK_ARGS, *SMALL_IMAGES, *_cheap(task)]
    full = train.run(common + ["--run-name", "full"])
    assert full["trainer"].global_step == 8
    ref = _state(full)
    from callbacks.final_checkpoint import CrashCheckpoint

    last = tmp_path / task / "run" / "last.ckpt"
    with pytest.raises(SystemExit):  # Ctrl-C: Lightning catches it, our crash checkpoint writes last.ckpt, exit(1)
        train.run(common + ["--run-name", "run"], extra_callbacks=[InterruptAt(3, raise_(KeyboardInterrupt))])
    assert read_checkpoint(last)["global_step"] == 3
    with monkeypatch.context() as m:  # SIGKILL runs no handler: only the periodic step checkpoint is on disk
        m.setattr(CrashCheckpoint, "on_exception", lambda *a, **k: None)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.run(common + ["--resume", str(last)],
                      extra_callbacks=[InterruptAt(4, raise_(RuntimeError), "validation")])
    assert read_checkpoint(last)["global_step"] == 4
    out = train.run(common + ["--resume", str(last)])
    assert out["trainer"].global_step == 8 and out["trainer"].current_epoch == 2
    _assert_same(ref, _state(out), f"{task} Ctrl-C at step 3, then kill at step 4")


COMBOS = [("kill", "batch", 15), ("int", "batch", 16), ("kill", "validation", 12), ("int", "validation", 12)]


@pytest.mark.parametrize("kind,at,step", COMBOS, ids=[f"{k}-{'mid_epoch' if a == 'batch' else 'epoch_end'}"
                                                      for k, a, _ in COMBOS])
def test_toy_resume_exact_with_workers(toy_registered, monkeypatch, kind, at, step):
    """The toy task draws its augmentation noise inside the workers; 12 steps per epoch, 3 epochs, checkpoint every 3:
    mid-epoch kills/Ctrl-C, and both right after the step checkpoint written on epoch 0's last step (step 12)."""
    common = ["--model", "toy", "--logger", "none", "--progress", "none", "--num-workers", "2", "--epochs", "3",
              "--ckpt-every-n-steps", "3"]
    full = train.run(common + ["--run-name", "full"])
    out, saved = _crash_and_resume(common, "crashed", step, at, kind, monkeypatch,
                                   toy_registered / "checkpoints" / "toy")
    assert saved["global_step"] == step
    assert out["trainer"].global_step == 36
    _assert_same(_state(full), _state(out), f"toy {kind} at {at} {step}")
    # the resumed run validated epoch 0 and kept the same best checkpoint as the uninterrupted one
    best = lambda d: sorted(p.name for p in d.glob("best-*.ckpt"))  # noqa: E731
    assert best(full["run_dir"]) == best(out["run_dir"])


def test_workers_give_the_same_batches_as_the_main_process(toy_registered):
    """Augmentation is a function of (seed, epoch, position): 0 and 2 workers train to identical weights."""
    common = ["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "6"]
    a = train.run(common + ["--num-workers", "0", "--run-name", "w0"])
    b = train.run(common + ["--num-workers", "2", "--run-name", "w2"])
    _assert_same(_state(a), _state(b), "0 vs 2 workers")


def _train_cmd(signal_name: str | None, step: int, at: str, extra: list[str]) -> list[str]:
    sig = ["--signal", signal_name, "--at-step", str(step), "--at", at] if signal_name else []
    return [sys.executable, str(ROOT / "tests" / "crash.py"), *sig, "--", "--model", "toy", "--logger", "none",
            "--progress", "none", "--num-workers", "2", "--epochs", "2", "--ckpt-every-n-steps", "3", *extra]


def _env(root: Path) -> dict[str, str]:
    return dict(os.environ, ZOO_CHECKPOINT_DIR=str(root / "checkpoints"), ZOO_DEMO_DIR=str(root / "demo"),
                PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The last.ckpt of one uninterrupted `train.py` process (the same for both signals: no signal is sent)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    full = subprocess.run(_train_cmd(None, 0, "batch", ["--run-name", "full"]), env=_env(root), capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    return read_checkpoint(root / "checkpoints" / "toy" / "full" / "last.ckpt")


@pytest.mark.slow  # three train.py processes (imports of Lightning, timm, ... each); in-process cases above
@pytest.mark.parametrize("signal_name,at,step", [("KILL", "batch", 16), ("INT", "validation", 12)])
def test_real_signal_then_resume(toy_registered, uninterrupted, signal_name, at, step):
    """A real SIGKILL (mid-epoch) or SIGINT to the process group (epoch end) of a train.py process with workers; the
    Ctrl-C prints where the checkpoint is and the command that resumes it, which then finishes the run exactly."""
    env = _env(toy_registered)
    crashed = subprocess.run(_train_cmd(signal_name, step, at, ["--run-name", "c"]), env=env,
                             capture_output=True, text=True, cwd=ROOT, timeout=300, start_new_session=True)
    last = toy_registered / "checkpoints" / "toy" / "c" / "last.ckpt"
    if signal_name == "KILL":
        assert crashed.returncode == -signal.SIGKILL
        assert read_checkpoint(last)["global_step"] == 15  # the step checkpoint before the kill
    else:
        assert crashed.returncode == 130, crashed.stderr[-2000:]  # 128 + SIGINT
        assert f"checkpoint saved to {last}" in crashed.stderr
        assert "Traceback" not in crashed.stderr
        command = next(line.strip() for line in crashed.stderr.splitlines() if "--resume" in line)
        assert command.endswith(f"--resume {last}") and "--run-name" not in command
    shutil.copy(last, toy_registered / "crash.ckpt")
    resumed = subprocess.run(_train_cmd(None, 0, at, ["--resume", str(last)]), env=env,
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = uninterrupted, read_checkpoint(last)
    assert a["global_step"] == b["global_step"] == 24
    _assert_same(a["state_dict"], b["state_dict"], f"real SIG{signal_name}")


@pytest.mark.parametrize("max_steps", [5, 11])
def test_a_run_stopped_by_max_steps_mid_epoch_resumes_exactly(toy_registered, max_steps):
    """`--max-steps N` ends a run mid-epoch: its last.ckpt is that step's (the epoch still open, the step's RNG
    state), so `--resume` without the flag finishes the rest of the epoch and equals the uninterrupted run."""
    common = ["--model", "toy", "--logger", "none", "--progress", "none", "--num-workers", "2"]
    full = train.run(common + ["--run-name", "full"])
    train.run(common + ["--run-name", "part", "--max-steps", str(max_steps)])
    last = toy_registered / "checkpoints" / "toy" / "part" / "last.ckpt"
    saved = read_checkpoint(last)
    assert (saved["global_step"], saved["epoch"]) == (max_steps, 0)
    out = train.run(common + ["--resume", str(last)])
    assert out["trainer"].global_step == full["trainer"].global_step == 24
    _assert_same(_state(full), _state(out), f"--max-steps {max_steps} then resumed")
