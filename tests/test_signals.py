"""A run stopped by a signal says so to whoever started it: SIGTERM (a scheduler's preemption or eviction) and SIGINT
(Ctrl-C) write last.ckpt, print the command that resumes it and exit 143 / 130 (128 + the signal, as shells and
schedulers expect), never 0; under Lightning's SLURM environment its auto-requeue handlers stay in place."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from crash import InterruptAt, send

import train
from zoo.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # real signals to train.py processes
@pytest.mark.parametrize("name, status, workers", [("TERM", 143, "0"), ("INT", 130, "0"), ("TERM", 143, "2")])
def test_a_signal_mid_epoch_saves_prints_the_resume_command_and_exits_128_plus_signal(tmp_path, name, status,
                                                                                      workers):
    """The signal goes to the process group, loader workers included (as Ctrl-C and SLURM's scancel send it)."""
    env = dict(os.environ, ZOO_CHECKPOINT_DIR=str(tmp_path / "ck"), ZOO_DEMO_DIR=str(tmp_path / "demo"),
               PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "crash.py"), "--signal", name, "--at-step", "5", "--",
                          "--model", "toy", "--logger", "none", "--progress", "none", "--num-workers", workers,
                          "--epochs", "3", "--run-name", "r"], env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=300, start_new_session=True)
    last = tmp_path / "ck" / "toy" / "r" / "last.ckpt"
    assert out.returncode == status, out.stderr[-3000:]
    step = read_checkpoint(last)["global_step"]  # SIGINT stops before step 5's batch; SIGTERM after it (a flag)
    assert step == (6 if name == "TERM" else 5)
    assert f"SIG{name}" in out.stderr and f"at step {step} " in out.stderr
    assert f"checkpoint saved to {last}" in out.stderr
    assert "Traceback" not in out.stderr
    command = next(line.strip() for line in out.stderr.splitlines() if "--resume" in line)
    assert command.endswith(f"--resume {last}") and "--run-name" not in command


def test_under_slurm_auto_requeue_the_handlers_stay_and_sigterm_still_exits_143(toy_registered, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for k, v in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "zoo",
                 "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(k, v)
    seen = {}

    def look_then_term():
        trainer = probe.trainer
        env = trainer._accelerator_connector.cluster_environment
        seen["slurm"] = isinstance(env, SLURMEnvironment) and env.auto_requeue
        seen["usr1"] = [getattr(h, "__name__", "") for h in getattr(signal.getsignal(env.requeue_signal),
                                                                     "signal_handlers", [])]
        seen["term"] = [getattr(h, "__name__", "") for h in getattr(signal.getsignal(signal.SIGTERM),
                                                                     "signal_handlers", [])]
        send(signal.SIGTERM)()

    class Probe(InterruptAt):
        def on_train_batch_start(self, trainer, *args):
            self.trainer = trainer
            super().on_train_batch_start(trainer, *args)

    probe = Probe(3, look_then_term)
    with pytest.raises(SystemExit) as e:
        train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--num-workers", "0", "--epochs", "2",
                   "--run-name", "s"], extra_callbacks=[probe])
    assert e.value.code == 143
    assert seen["slurm"] and "_slurm_sigusr_handler_fn" in seen["usr1"]
    assert {"_sigterm_notifier_fn", "_sigterm_handler_fn"} <= set(seen["term"])
    assert read_checkpoint(toy_registered / "checkpoints" / "toy" / "s" / "last.ckpt")["global_step"] == 4
