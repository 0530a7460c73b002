"""The one place a Trainer is built: loggers, checkpointing, progress bar, precision, devices and strategy."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    RichModelSummary,
)

from callbacks.compile import CompileNetwork
from callbacks.divergence import DivergenceGuard
from callbacks.final_checkpoint import CrashCheckpoint, FinalCheckpoint
from callbacks.loop_state import EpochEndResume
from callbacks.progress import CompactRichProgressBar
from callbacks.rng_state import RNGStateCallback
from zoo.errors import ZooError


class RunInterrupted(SystemExit):
    """A run stopped by SIGTERM (a scheduler's preemption or eviction) or SIGINT (Ctrl-C): the process exits with
    128 + the signal number (143, 130), as shells and schedulers expect of a killed job, never 0."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)


def interrupting_signal(exc: BaseException) -> int | None:
    """The signal behind an exception out of `trainer.fit` / `validate` / `test`, else None: Lightning turns SIGTERM
    into a `SIGTERMException` (a SystemExit with status 0) and a KeyboardInterrupt into `sys.exit(1)`."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(exc, SIGTERMException):
        return signal.SIGTERM
    if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit)
                                              and isinstance(exc.__context__, KeyboardInterrupt)):
        return signal.SIGINT
    return None


@contextlib.contextmanager
def exit_status_of_signals():
    """Around a Trainer call: a stop by SIGTERM / SIGINT leaves as `RunInterrupted` (after Lightning's own handling:
    the crash checkpoint, and under SLURM its requeue handlers, which this does not touch)."""
    try:
        yield
    except RunInterrupted:
        raise
    except BaseException as e:
        signum = interrupting_signal(e)
        if signum is None:
            raise
        raise RunInterrupted(signum) from None


CHECKPOINT_ROOT = Path(os.environ.get("ZOO_CHECKPOINT_DIR") or Path(__file__).resolve().parent.parent / "checkpoints")


@dataclass
class RunOptions:
    """Trainer-level options from the command line (model hyper-parameters live in the model's config)."""

    model: str
    run_dir: Path
    epochs: int
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str | None = None  # None: bf16-mixed on a GPU, 32-true on the CPU
    accumulate: int = 1
    grad_clip: float = 0.0
    logger: str = "wandb"  # wandb | csv | none
    wandb_project: str | None = None
    log_model: bool = False
    fast_dev_run: bool = False
    max_steps: int = -1
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    save_top_k: int = 1
    ckpt_every_n_steps: int = 0
    deterministic: bool = False
    progress: str = "rich"  # rich | tqdm | none
    compile: str | None = None  # a torch.compile backend: the network is compiled (callbacks.compile); None = eager


# Lightning and dependency messages that say nothing about this run (the run prints its own device and paths).
_QUIET_INFO = ("GPU available", "TPU available", "HPU available", "\U0001f4a1 Tip", "Detected KeyboardInterrupt",
               "Trainer already configured with model summary", "`Trainer.fit` stopped")
_QUIET_WARNINGS = (r".*'set_vital' is deprecated", r".*isinstance\(treespec, LeafSpec\)",
                   r"Checkpoint directory .* exists and is not empty", r".*`weights_only` was not set")


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(_QUIET_INFO)


def quiet_lightning() -> None:
    """Silence Lightning's hardware banner and tips and the deprecation warnings of our dependencies (idempotent)."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropInfo) for f in log.filters):
        log.addFilter(_DropInfo())
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def default_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def wandb_online_possible(timeout: float = 1.5) -> tuple[bool, str]:
    """(True, '') when an API key is configured and the W&B server answers; else (False, why)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return False, f"WANDB_MODE={os.environ['WANDB_MODE']}"
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        has_key = netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if not has_key:
        return False, "no W&B API key (run `wandb login` or set WANDB_API_KEY)"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
    except OSError:
        return False, f"no network connection to {host}"
    return True, ""


def build_logger(opts: RunOptions, config: dict[str, Any]):
    """W&B (offline when there is no key or network: training never blocks), CSV, or none."""
    if opts.fast_dev_run or opts.logger == "none":
        return False
    if opts.logger == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir=str(opts.run_dir), name="", version="csv")
    if opts.logger != "wandb":
        raise ZooError(f"--logger {opts.logger}: choose wandb, csv or none.")
    from lightning.pytorch.loggers import WandbLogger

    online, why = wandb_online_possible()
    if not online:
        print(f"[train] W&B offline ({why}): the run is saved under {opts.run_dir / 'wandb'}; "
              f"upload it later with `wandb sync {opts.run_dir / 'wandb'}/offline-run-*`.")
    # The run id is kept in the run directory so a resumed run continues the same W&B run.
    id_file = opts.run_dir / "wandb_id.txt"
    resuming = id_file.exists() and id_file.read_text().strip()
    if not resuming:
        import secrets

        id_file.write_text(secrets.token_hex(4))  # W&B run ids are short [a-z0-9] strings
    run_id = id_file.read_text().strip()
    logger = WandbLogger(
        project=opts.wandb_project or f"mamba-zoo-{opts.model}",
        name=opts.run_dir.name,
        save_dir=str(opts.run_dir),
        offline=not online,
        log_model=opts.log_model if online else False,
        id=run_id,
        resume="allow" if resuming else None,
        config=config,
    )
    # Lightning hands `anonymous=None` to wandb.init unconditionally, and wandb warns "The anonymous setting has no
    # effect and will be removed" for any value of that deprecated setting (wandb/wandb#10909). Leave it out.
    logger._wandb_init.pop("anonymous", None)
    return logger


def build_callbacks(opts: RunOptions) -> list[L.Callback]:
    """Checkpointing (last.ckpt always, best-k by the task's monitor, a checkpoint on any crash or Ctrl-C)."""
    ckpt_dir = opts.run_dir
    monitor_name = opts.monitor.replace("/", "_")
    compiling: list[L.Callback] = [CompileNetwork(opts.compile)] if opts.compile else []
    if opts.fast_dev_run:  # a smoke test: writes no checkpoint that a later --resume last could pick up
        callbacks: list[L.Callback] = [DivergenceGuard(), *compiling]
        if opts.progress == "rich":
            callbacks.append(CompactRichProgressBar(opts.monitor, leave=True))
        return callbacks
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best-{epoch:03d}-{step}-" + monitor_name + "={" + opts.monitor + ":.4f}",
            auto_insert_metric_name=False,
            monitor=opts.monitor,
            mode=opts.monitor_mode,
            save_top_k=opts.save_top_k,
            save_last=True,
            enable_version_counter=False,  # one last.ckpt per run, whichever checkpointer wrote it last
        ),
        CrashCheckpoint(dirpath=ckpt_dir, filename="last", model=opts.model),
        RNGStateCallback(),
        EpochEndResume(),
        DivergenceGuard(),
        FinalCheckpoint(ckpt_dir),  # a Checkpoint: Lightning runs it after every other callback
        *compiling,
    ]
    if opts.ckpt_every_n_steps > 0:
        # A second checkpointer that only refreshes last.ckpt mid-epoch, so a killed run loses at most N steps.
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step}", save_top_k=0, save_last=True,
                                         every_n_train_steps=opts.ckpt_every_n_steps, enable_version_counter=False))
    if opts.progress == "rich":
        callbacks += [CompactRichProgressBar(opts.monitor, leave=True), RichModelSummary(max_depth=2)]
    if opts.logger != "none" and not opts.fast_dev_run:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def build_trainer(opts: RunOptions, config: dict[str, Any], write_run_dir: bool = True) -> L.Trainer:
    """The Trainer of a run. `write_run_dir=False` (validate / test, fast dev runs) creates and writes nothing in
    `opts.run_dir`."""
    quiet_lightning()
    write_run_dir = write_run_dir and not opts.fast_dev_run
    if write_run_dir:
        opts.run_dir.mkdir(parents=True, exist_ok=True)
        (opts.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(opts.run_dir),
        max_epochs=opts.epochs,
        max_steps=opts.max_steps,
        accelerator="auto",
        devices=opts.devices,
        num_nodes=opts.num_nodes,
        strategy=opts.strategy,
        use_distributed_sampler=False,  # our samplers shard by rank themselves (datamodules/samplers.py)
        precision=opts.precision or default_precision(),
        accumulate_grad_batches=opts.accumulate,
        gradient_clip_val=opts.grad_clip or None,
        logger=build_logger(opts, config) if write_run_dir else False,
        callbacks=build_callbacks(opts),
        enable_checkpointing=not opts.fast_dev_run,
        fast_dev_run=opts.fast_dev_run,
        deterministic=opts.deterministic,
        enable_progress_bar=opts.progress != "none",
        enable_model_summary=opts.progress != "none",
        log_every_n_steps=10,
    )
    if opts.limit_train_batches is not None:
        kwargs["limit_train_batches"] = opts.limit_train_batches
    if opts.limit_val_batches is not None:
        kwargs["limit_val_batches"] = opts.limit_val_batches
    return L.Trainer(**kwargs)
