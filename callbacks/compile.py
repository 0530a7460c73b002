"""`--compile`: `torch.compile` of a task's network (`module.net`), and one line that says what compiling cost.

The network is compiled in place: its call (`nn.Module.compile`) and its other entry points, the `forward_*` methods
its class defines (DeMansia 2 trains through `forward_train`), each compiled lazily on first use. Its parameters stay
where they are, so a compiled run's checkpoints hold the same state-dict keys as an eager run's (no `_orig_mod.`
prefix) and open, or resume, without compiling. A copy of the network (an EMA's `deepcopy`) calls eager (`nn.Module`
does not copy its compiled call) and its `forward_*` methods compiled, bound to the copy.
"""
from __future__ import annotations

import statistics
import time
import types
from typing import Any

import lightning as L
import torch
from torch import nn

from zoo.errors import ZooError

DEFAULT_BACKEND = "inductor"


def check_backend(backend: str, flag: str = "--compile") -> None:
    """A one-line ZooError when `backend` is not one `torch.compile` knows."""
    from torch._dynamo import list_backends

    known = list_backends(exclude_tags=())
    if backend not in known:
        raise ZooError(f"{flag} {backend}: not a torch.compile backend. Use one of {', '.join(sorted(known))} "
                       f"(inductor generates code; aot_eager and eager only capture the graph, for debugging).")


def network_of(module: nn.Module) -> nn.Module:
    """The network a task trains, `module.net` (docs/conventions.md)."""
    net = getattr(module, "net", None)
    if not isinstance(net, nn.Module):
        raise ZooError(f"--compile: {type(module).__name__} has no network attribute `net` (docs/conventions.md), "
                       f"so there is nothing to compile. Run without --compile.")
    return net


class CallTimes:
    """Wall-clock durations of repeated calls (the first one pays for compilation); CUDA work is waited for."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None

    def start(self) -> None:
        _sync()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            _sync()
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def summary(self, what: str) -> str:
        """`first <what> 12.3 s, then 0.045 s (median of 9)`; '' before any call."""
        if not self.seconds:
            return ""
        first = f"first {what} {self.seconds[0]:.2f} s"
        if len(self.seconds) == 1:
            return f"{first} (no later one to compare)"
        later = statistics.median(self.seconds[1:])
        return f"{first}, then {later:.3g} s (median of {len(self.seconds) - 1})"


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def compile_in_place(net: nn.Module, backend: str = DEFAULT_BACKEND) -> None:
    """`net.compile()` and every `forward_*` method of its class compiled, as an attribute of `net` (not in its
    state dict; `copy.deepcopy` binds it to the copy)."""
    import einops

    # einops caches a backend per tensor type on first use, and compiled graphs guard on the size of that cache:
    # a Parameter first seen by eager code after the first compilation (an EMA copy's call) would recompile it.
    for t in (torch.zeros(1), nn.Parameter(torch.zeros(1))):
        einops.rearrange(t, "a -> a")
    net.compile(backend=backend)
    for name in dir(type(net)):
        method = getattr(type(net), name, None)
        if name.startswith("forward_") and isinstance(method, types.FunctionType):
            setattr(net, name, types.MethodType(torch.compile(method, backend=backend), net))


def compile_network(module: nn.Module, backend: str = DEFAULT_BACKEND) -> CallTimes:
    """Compile `module.net` in place and time each of its calls (predict.py's use: inference calls the network)."""
    net = network_of(module)
    compile_in_place(net, backend)
    compiled, times = net._compiled_call_impl, CallTimes()

    def timed(*args: Any, **kwargs: Any) -> Any:
        times.start()
        try:
            return compiled(*args, **kwargs)
        finally:
            times.stop()

    net._compiled_call_impl = timed  # what nn.Module.__call__ runs once compiled; never pickled
    return times


class CompileNetwork(L.Callback):
    """`train.py --compile`: compiles the LightningModule's `net` at setup and prints one line, after
    `report_after` training steps (or at the end of a shorter run, or of `--validate` / `--test`): the first
    training step and validation batch (each compiles a graph: train and eval mode differ) against the later ones.

    Args:
        backend: the `torch.compile` backend (inductor generates code; aot_eager / eager only capture the graph).
        report_after: training steps timed before the line is printed.
    """

    PHASES = {"train": "training step", "validation": "validation batch", "test": "test batch"}

    def __init__(self, backend: str = DEFAULT_BACKEND, report_after: int = 10):
        self.backend, self.report_after = backend, report_after
        self.times = {phase: CallTimes() for phase in self.PHASES}
        self.reported = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        net = network_of(pl_module)
        if net._compiled_call_impl is None:
            compile_in_place(net, self.backend)

    def line(self) -> str:
        parts = [t.summary(self.PHASES[p]) for p, t in self.times.items()]
        return f"[compile] torch.compile ({self.backend}) of the network: " + "; ".join(p for p in parts if p)

    def _report(self, trainer: L.Trainer) -> None:
        if not self.reported and any(t.seconds for t in self.times.values()) and trainer.is_global_zero:
            print(self.line(), flush=True)
        self.reported = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.times["train"].start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times["train"].stop()
        if len(self.times["train"].seconds) > self.report_after:
            self._report(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.times["validation"].start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.times["validation"].stop()

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.times["test"].start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.times["test"].stop()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._report(trainer)
