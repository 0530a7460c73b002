"""Task commands for `predict.py`: each task's LightningModule lists its verbs (classify, compare, export, ...)."""
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
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Any, argparse.Namespace], int]
    aliases: tuple[str, ...] = ()
