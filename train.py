#!/usr/bin/env python
"""The one training entrypoint of the zoo.

    python train.py --model demansia2                       # demo data, default preset
    python train.py --model demansia2 --preset tiny --data-dir /data/imagenet --devices 4 --strategy ddp
    python train.py --model face --set metric_loss=arcface --set embedding_dim=512
    python train.py --model demansia2 --resume last         # continue the newest run exactly where it stopped
    python train.py --model demansia2 --validate --ckpt checkpoints/demansia2/<run>/last.ckpt
    python train.py --list
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from model_config import DEFAULT_MODEL, REGISTRY, get_entry  # noqa: E402
from zoo.errors import ZooError, user_message  # noqa: E402

# Flags that are shortcuts for config fields (flag dest -> config field).
CONFIG_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "accumulate": "accumulate",
                "seed": "seed", "num_workers": "num_workers"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train a model of the Mamba vision zoo (PyTorch Lightning).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model name (default {DEFAULT_MODEL}); see --list")
    p.add_argument("--list", action="store_true", help="list the models (one line each, with parameter counts) and exit")
    p.add_argument("--preset", default=None, help="config preset(s), comma-separated, applied in order "
                   "(e.g. micro, tiny, small, published); default: the model's default preset")
    p.add_argument("--data-dir", default=None, help="dataset root in its published layout; omit for built-in demo data")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, repeatable (e.g. --set d_model=256 --set ema=false)")
    p.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--describe-data", action="store_true", help="print what the data reader found (images kept and "
                   "dropped, split sizes, the task's own breakdowns) and exit")
    p.add_argument("--json", action="store_true", help="with --describe-data / --show-config: JSON only")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per device")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--accumulate", type=int, help="gradient accumulation steps")
    g.add_argument("--seed", type=int)
    g.add_argument("--num-workers", type=int, help="data-loader worker processes")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    g.add_argument("--limit-train-batches", type=_batches, default=None,
                   help="number of batches (an integer: 1 = one batch) or fraction (with a point: 1.0 = all, 0.25)")
    g.add_argument("--limit-val-batches", type=_batches, default=None,
                   help="number of batches (an integer: 1 = one batch) or fraction (with a point: 1.0 = all, 0.25)")
    g.add_argument("--fast-dev-run", action="store_true", help="one training and one validation batch, no logging")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    h = p.add_argument_group("hardware")
    h.add_argument("--precision", default=None, help="32-true, bf16-mixed, 16-mixed, ... (default: bf16-mixed on "
                   "GPU, 32-true on CPU)")
    h.add_argument("--devices", default="auto", help="number of devices, or a list like 0,1 (default auto)")
    h.add_argument("--num-nodes", type=int, default=1)
    h.add_argument("--strategy", default="auto", help="auto, ddp, fsdp, deepspeed, ... (passed to the Trainer)")
    h.add_argument("--compile", action="store_true", help="torch.compile the network; prints how long the first "
                   "compiled step took against later ones (default: eager)")
    h.add_argument("--compile-backend", default=None, metavar="BACKEND", help="torch.compile backend (implies "
                   "--compile; default inductor; aot_eager or eager only capture the graph)")
    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--run-name", default=None, help="run folder under checkpoints/<model>/ (default: preset-time)")
    c.add_argument("--resume", default=None, metavar="PATH|last", help="continue a run from a checkpoint, or the "
                   "newest last.ckpt of this model")
    c.add_argument("--ckpt-every-n-steps", type=int, default=None, help="refresh last.ckpt every N steps mid-epoch")
    c.add_argument("--validate", action="store_true", help="run validation on --ckpt and exit")
    c.add_argument("--test", action="store_true", help="run the test split on --ckpt and exit")
    c.add_argument("--ckpt", default=None, help="checkpoint for --validate / --test ('last' = newest)")
    c.add_argument("--trust-checkpoint", action="store_true", help="load --resume / --ckpt with full pickle, which "
                   "can run code: only for a file you trust that holds types beyond tensors and plain data")
    c.add_argument("--logger", choices=["wandb", "csv", "none"], default="wandb",
                   help="wandb (default; offline without key/network), csv or none")
    c.add_argument("--wandb-project", default=None, help="default: mamba-zoo-<model>")
    c.add_argument("--log-model", action="store_true", help="upload checkpoints to W&B as artifacts")
    c.add_argument("--progress", choices=["rich", "tqdm", "none"], default="rich")
    return p


def say(line: str) -> None:
    """Print once per run: the processes a multi-device strategy starts (LOCAL_RANK / RANK > 0) stay quiet."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(line, flush=True)


def list_models() -> str:
    """One line per registered model: name, status, presets with parameter counts, summary."""
    from zoo.summary import cached_counts

    ready = [e for e in REGISTRY.values() if e.status == "ready"]
    counts = cached_counts(ready)
    lines = []
    for name, entry in REGISTRY.items():
        if entry.status != "ready":
            lines.append(f"{name:<10} [{entry.status}] {entry.summary}")
            continue
        shown = []
        for preset, n in counts.get(name, {}).items():
            if isinstance(n, str):
                shown.append(f"{preset} ? ({n})")
            else:
                shown.append(f"{preset} {n / 1e6:.2f}M" if n < 1e9 else f"{preset} {n / 1e9:.2f}B")
        default = entry.config.DEFAULT_PRESET
        lines.append(f"{name:<10} {entry.summary}\n{'':<10} presets: {' | '.join(shown)} (default {default})")
    return "\n".join(lines)


def resolve_config(args: argparse.Namespace, entry, ckpt: dict[str, Any] | None):
    """Config = checkpoint's (when resuming) or defaults + presets, then flag shortcuts, then --set overrides."""
    if ckpt is not None:
        cfg = entry.config.from_dict(ckpt["hyper_parameters"]["config"], strict=False)
    else:
        if args.preset is None:  # the preset follows the data: real-size on a real dataset, micro on the demo
            from datamodules.demo import is_demo_dir

            real = args.data_dir and not is_demo_dir(args.data_dir) and "tiny" in entry.config.PRESETS
            args.preset = "tiny" if real else entry.config.DEFAULT_PRESET
        cfg = entry.config.from_presets(args.preset)
    changes = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    cfg = cfg.replace(**changes)
    return cfg.with_overrides(args.overrides)


def run_headline(name: str, preset: str | None, model, datamodule, from_checkpoint: bool) -> str:
    """The first line of a run: the model, its preset and size, and the data found."""
    n = model.parameter_count()
    size = f"{n / 1e6:.2f}M parameters" if n < 1e9 else f"{n / 1e9:.2f}B parameters"
    where = "checkpoint's config" if from_checkpoint else f"preset {preset or 'defaults'}"
    data = datamodule.summary() if hasattr(datamodule, "summary") else (
        "demo data" if getattr(datamodule, "is_demo", False) else str(getattr(datamodule, "data_dir", "")))
    return f"[train] {name}, {where}, {size}; data: {data}"


def results_table(results: list[dict[str, float]]) -> str:
    """`--validate` / `--test` metrics with one column per split (val, test), not one per Lightning dataloader (a
    task whose metrics cover several loaders logs the same values under each)."""
    table: dict[str, dict[str, float]] = {}
    for per_loader in results:
        for key, value in per_loader.items():
            split, _, metric = key.split("/dataloader_idx")[0].partition("/")
            table.setdefault(metric or split, {})[split if metric else "value"] = float(value)
    splits = sorted({s for row in table.values() for s in row})
    width = max([len(m) for m in table] + [6])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{s:>10}" for s in splits)]
    for metric in sorted(table):
        lines.append(f"{metric:<{width}}  " + "  ".join(
            f"{table[metric][s]:>10.4f}" if s in table[metric] else f"{'-':>10}" for s in splits))
    return "\n".join(lines)


def is_run_dir_of(folder: Path, model: str) -> bool:
    """Whether `folder` is a run folder train.py made for `model` (its config.json names the model)."""
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("model") == model
    except (OSError, ValueError, AttributeError):
        return False


RUN_DIR_ENV = "ZOO_RUN_DIR"


def make_run_dir(args: argparse.Namespace, entry, resume_path: Path | None) -> Path:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from zoo.trainer import CHECKPOINT_ROOT

    if rank_zero_only.rank != 0 and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])  # a process DDP started: the run folder rank 0 chose, not a new one
    if resume_path is not None and is_run_dir_of(resume_path.parent, entry.name):
        run_dir = resume_path.parent  # a checkpoint elsewhere (a download, another model's folder) gets a new folder
    else:
        preset = (args.preset or entry.config.DEFAULT_PRESET or "default").replace(",", "+")
        name = args.run_name or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = CHECKPOINT_ROOT / entry.name / name
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the processes a multi-device strategy launches
    return run_dir


def check_cli(args: argparse.Namespace) -> None:
    """Command-line values that are not config fields: a one-line ZooError before anything loads."""
    if args.precision is not None:
        import typing

        from lightning.fabric.connector import _PRECISION_INPUT

        valid = [str(v) for lit in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(lit)]
        if args.precision not in valid:
            raise ZooError(f"--precision {args.precision}: not a precision Lightning knows. Use one of "
                           f"{', '.join(dict.fromkeys(valid))} (bf16-mixed on recent GPUs, 32-true on the CPU).")
    for flag, value, lo in (("--max-steps", args.max_steps, -1), ("--num-nodes", args.num_nodes, 1),
                            ("--ckpt-every-n-steps", args.ckpt_every_n_steps, 0)):
        if value is not None and (value < lo or (flag == "--max-steps" and value == 0)):
            rule = "-1 (no limit) or >= 1" if flag == "--max-steps" else f">= {lo}"
            raise ZooError(f"{flag} {value}: must be {rule}.")
    for flag, value in (("--limit-train-batches", args.limit_train_batches),
                        ("--limit-val-batches", args.limit_val_batches)):
        if value is not None and not value >= 0:
            raise ZooError(f"{flag} {value}: must be a fraction in [0, 1] or a number of batches >= 1.")
    if args.compile or args.compile_backend:
        from callbacks.compile import check_backend

        check_backend(args.compile_backend or "inductor", "--compile-backend")


def check_run_dir(run_dir: Path) -> None:
    """The run folder can be created and written: probed in its nearest existing ancestor, creating nothing."""
    import tempfile

    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ZooError(f"Run folder {run_dir}: {existing} exists and is not a folder. Choose another --run-name (or "
                       f"ZOO_CHECKPOINT_DIR).")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
        if existing != run_dir:  # creating folders can fail where files can be written (and the reverse)
            tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise ZooError(f"Run folder {run_dir} cannot be created or written ({existing}: {e.strerror or e}). Choose "
                       f"a writable place with --run-name or ZOO_CHECKPOINT_DIR.") from None


def run(argv: list[str] | None = None, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Parse `argv`, then train / validate / test. Returns the trainer, model, datamodule and run directory."""
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_models())
        return {}
    check_cli(args)
    entry = get_entry(args.model)
    module_cls, dm_cls = entry.load("module"), entry.load("datamodule")

    import lightning as L

    from zoo.checkpoint import checkpoint_task, find_last, read_checkpoint
    from zoo.trainer import CHECKPOINT_ROOT, RunOptions, build_trainer

    resume_path = ckpt = None
    if args.resume:
        resume_path = find_last(entry.name, CHECKPOINT_ROOT) if args.resume == "last" else Path(args.resume)
        ckpt = read_checkpoint(resume_path, trust=args.trust_checkpoint, weights_for="--resume")
        task = checkpoint_task(ckpt, resume_path)
        if task != entry.name:
            raise ZooError(f"--resume {resume_path} holds a '{task}' model, but --model is '{entry.name}'. "
                           f"Run `python train.py --model {task} --resume {resume_path}`.")
        say(f"[train] resuming {resume_path} at epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')}")
    eval_path = None
    if args.validate or args.test:
        if not args.ckpt:
            raise ZooError("--validate / --test need --ckpt PATH (or --ckpt last).")
        eval_path = find_last(entry.name, CHECKPOINT_ROOT) if args.ckpt == "last" else Path(args.ckpt)
        ckpt = read_checkpoint(eval_path, trust=args.trust_checkpoint, weights_for="--validate / --test")
        task = checkpoint_task(ckpt, eval_path)
        if task != entry.name:
            raise ZooError(f"--ckpt {eval_path} holds a '{task}' model, not '{entry.name}'. Use --model {task}.")

    cfg = resolve_config(args, entry, ckpt)
    if ckpt is not None:  # a file's config builds nothing before it fits the file's tensors (on the meta device)
        from zoo.bounded import fit_on_meta

        fit_on_meta(module_cls, cfg, entry.name, ckpt, resume_path or eval_path)
    if args.show_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return {"config": cfg}
    check_run_dir(make_run_dir(args, entry, resume_path or eval_path))

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = dm_cls(cfg, data_dir=args.data_dir)
    if args.describe_data:  # reading only: no caches written (prepare_data), no run folder
        import contextlib

        # With --json, stdout holds the JSON only: what the reader prints while reading goes to stderr.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            datamodule.setup("fit")
            info = datamodule.describe()
        return {"data": print_description(info, args.json, entry.name, args.data_dir or "built-in demo data")}
    datamodule.prepare_data()
    datamodule.setup("fit")
    data_fields = datamodule.config_overrides()
    if ckpt is None:
        cfg = cfg.replace(**data_fields)
    datamodule.cfg = cfg
    model = module_cls(config=cfg)
    say(run_headline(entry.name, args.preset, model, datamodule, ckpt is not None))

    run_dir = make_run_dir(args, entry, resume_path or (eval_path if eval_path else None))
    opts = RunOptions(
        model=entry.name, run_dir=run_dir, epochs=cfg.epochs, devices=args.devices, num_nodes=args.num_nodes,
        strategy=args.strategy, precision=args.precision, accumulate=cfg.accumulate, grad_clip=cfg.grad_clip,
        logger=args.logger, wandb_project=args.wandb_project, log_model=args.log_model,
        fast_dev_run=args.fast_dev_run, max_steps=args.max_steps, limit_train_batches=_limit(args.limit_train_batches),
        limit_val_batches=_limit(args.limit_val_batches), monitor=cfg.monitor, monitor_mode=cfg.monitor_mode,
        save_top_k=cfg.save_top_k, deterministic=args.deterministic, progress=args.progress,
        ckpt_every_n_steps=args.ckpt_every_n_steps if args.ckpt_every_n_steps is not None else cfg.ckpt_every_n_steps,
        compile=(args.compile_backend or "inductor") if args.compile or args.compile_backend else None,
    )
    # --validate / --test write nothing beside the checkpoint unless it sits in a run folder of this model
    owns_dir = eval_path is None or is_run_dir_of(run_dir, entry.name)
    created = not run_dir.exists()
    try:
        trainer = build_trainer(opts, {"model": entry.name, **cfg.to_dict()}, write_run_dir=owns_dir)
        return _run_trainer(trainer, args, model, datamodule, module_cls, run_dir, resume_path, eval_path,
                            extra_callbacks)
    except BaseException:
        if created:  # a failed run leaves no folder without a checkpoint in it
            _remove_if_no_checkpoint(run_dir)
        raise


def _remove_if_no_checkpoint(run_dir: Path) -> None:
    import shutil

    if run_dir.is_dir() and not any(run_dir.rglob("*.ckpt")):
        shutil.rmtree(run_dir, ignore_errors=True)


def _run_trainer(trainer, args, model, datamodule, module_cls, run_dir, resume_path, eval_path, extra_callbacks):
    from zoo.checkpoint import safe_globals
    from zoo.trainer import exit_status_of_signals

    for cb in extra_callbacks or []:
        trainer.callbacks.append(cb)

    if eval_path is not None:
        fn = trainer.test if args.test else trainer.validate
        with safe_globals(), exit_status_of_signals():  # Lightning reads the file again (same allow-list)
            results = fn(model, datamodule=datamodule, ckpt_path=str(eval_path),
                         weights_only=not args.trust_checkpoint, verbose=False)
        if trainer.is_global_zero:
            print(results_table(results))
        return {"trainer": trainer, "model": model, "datamodule": datamodule, "results": results, "run_dir": run_dir}
    with safe_globals(), exit_status_of_signals():  # SIGTERM / SIGINT: last.ckpt, resume command, exit 143 / 130
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_path) if resume_path else None,
                    weights_only=not args.trust_checkpoint)
    if not args.fast_dev_run and trainer.is_global_zero:
        print(f"[train] checkpoints in {run_dir} (last.ckpt, best-*.ckpt). Open one with "
              f"`{module_cls.__name__}.load_from_checkpoint(path)` or `python predict.py ... --ckpt PATH`.")
    return {"trainer": trainer, "model": model, "datamodule": datamodule, "run_dir": run_dir}


def print_description(info: dict[str, Any], as_json: bool, model: str, source: str) -> dict[str, Any]:
    """`--describe-data`: JSON, or one line per entry."""
    import json

    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return info
    print(f"[data] {model} reader on {source}:")
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
        print(f"  {key:<16} {value}")
    return info


def _batches(text: str) -> float | int:
    """`--limit-*-batches`: "1" is one batch and "1.0" all of them, as in Lightning's own CLI (int = count)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _limit(x: float | None) -> float | int | None:
    return int(x) if x is not None and (isinstance(x, int) or x > 1) else x


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except ZooError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
