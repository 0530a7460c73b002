"""Task commands for `predict.py`: each task's LightningModule lists its verbs (classify, compare, export, ...).

A task declares its verbs once, as `COMMANDS: list[Command]` at the end of its `verbs.py`, which its module's
`predict_commands()` returns; docs/conventions.md lists the verb names shared by the tasks.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """One `predict.py` verb of a task.

    add_arguments: adds the verb's own arguments to its argparse parser (`--ckpt` and `--device` exist already).
    run: `run(model, args) -> int` with the model loaded from the checkpoint in eval mode; returns an exit status and
        prints its results (text, or JSON with `--json` where the verb offers it).
    inference: run under `torch.inference_mode()` (no autograd bookkeeping); False for verbs that trace or export.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Any, argparse.Namespace], int]
    aliases: tuple[str, ...] = ()
    inference: bool = True

    def __call__(self, model: Any, args: argparse.Namespace) -> int:
        """Run the verb (under inference mode unless `inference` is False)."""
        if not self.inference:
            return self.run(model, args)
        import torch

        with torch.inference_mode():
            return self.run(model, args)
