"""Simulated crashes for resume tests, and a command line that runs train.py and kills it with a real signal.

    python tests/crash.py --signal INT --at-step 3 [--at validation] -- --model toy ...   (train.py's arguments)

sends the signal to its own process group (SIGINT as Ctrl-C in a terminal does, SIGTERM as SLURM does) or to
itself (SIGKILL) once
`global_step` reaches the step: before that step's batch trains (`--at batch`) or when the epoch-end validation
starts (`--at validation`, i.e. after the epoch's last step and its step checkpoint). `--model toy` is the test-only
task of tests/toy_task.py.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import lightning as L


class StopAt(L.Callback):
    """Simulates a killed run: raises once `global_step` reaches `step`, before that batch trains."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")


class InterruptAt(L.Callback):
    """Calls `action()` once `global_step` reaches `step`: before that batch trains (at="batch"), or when the fit's
    validation starts (at="validation": after an epoch's last step and the checkpoints written in that step)."""

    def __init__(self, step: int, action, at: str = "batch"):
        self.step, self.action, self.at, self.done = step, action, at, False

    def _maybe(self, trainer, where: str) -> None:
        if not self.done and where == self.at and trainer.state.fn == "fit" and not trainer.sanity_checking \
                and trainer.global_step >= self.step:
            self.done = True
            self.action()

    def on_train_batch_start(self, trainer, *args):
        self._maybe(trainer, "batch")

    def on_validation_start(self, trainer, *args):
        self._maybe(trainer, "validation")


def raise_(exc: type[BaseException]):
    def action():
        raise exc("simulated crash" if exc is RuntimeError else "")
    return action


def send(sig: signal.Signals):
    def action():
        if sig in (signal.SIGINT, signal.SIGTERM) and os.getpgid(0) == os.getpid():
            # like Ctrl-C (the foreground group) or a scheduler (SLURM's scancel: every process of the job step):
            # loader workers included. Only from a process that leads its own group (the tests start train.py with
            # start_new_session): inside pytest the group is the test runner's and CI's, which must not be signalled.
            os.killpg(os.getpgid(0), sig)
        else:
            os.kill(os.getpid(), sig)
    return action


def main(argv: list[str]) -> int:
    sep = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--signal", choices=["INT", "TERM", "KILL"], default=None, help="none: just run train.py")
    p.add_argument("--at-step", type=int, default=0)
    p.add_argument("--at", choices=["batch", "validation"], default="batch")
    a = p.parse_args(argv[:sep])
    if a.signal == "INT":
        # A shell runs background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        # (CI may run the suite that way); Ctrl-C in a terminal reaches a foreground process with the default one.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [root, os.path.join(root, "tests")]
    from toy_task import ENTRY

    import model_config
    import train

    model_config.REGISTRY.setdefault("toy", ENTRY)
    sys.argv = [os.path.join(root, "train.py"), *argv[sep + 1:]]
    cbs = [InterruptAt(a.at_step, send(getattr(signal, f"SIG{a.signal}")), a.at)] if a.signal else []
    try:
        train.run(argv[sep + 1:], extra_callbacks=cbs)
    except train.ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
