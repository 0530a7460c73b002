#!/usr/bin/env python
"""The one training entrypoint of the zoo.

    python train.py --model demansia2                       # demo data, default preset
    python train.py --model demansia2 --preset tiny --data-dir /data/imagenet --devices 4 --strategy ddp
    python train.py --model face --set loss=arcface --set embedding_dim=512
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
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="per device")
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--accumulate", type=int, help="gradient accumulation steps")
    g.add_argument("--seed", type=int)
    g.add_argument("--num-workers", type=int, help="data-loader worker processes")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    g.add_argument("--limit-train-batches", type=float, default=None, help="fraction (<=1) or number of batches")
    g.add_argument("--limit-val-batches", type=float, default=None, help="fraction (<=1) or number of batches")
    g.add_argument("--fast-dev-run", action="store_true", help="one training and one validation batch, no logging")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    h = p.add_argument_group("hardware")
    h.add_argument("--precision", default=None, help="32-true, bf16-mixed, 16-mixed, ... (default: bf16-mixed on "
                   "GPU, 32-true on CPU)")
    h.add_argument("--devices", default="auto", help="number of devices, or a list like 0,1 (default auto)")
    h.add_argument("--num-nodes", type=int, default=1)
    h.add_argument("--strategy", default="auto", help="auto, ddp, fsdp, deepspeed, ... (passed to the Trainer)")
    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--run-name", default=None, help="run folder under checkpoints/<model>/ (default: preset-time)")
    c.add_argument("--resume", default=None, metavar="PATH|last", help="continue a run from a checkpoint, or the "
                   "newest last.ckpt of this model")
    c.add_argument("--ckpt-every-n-steps", type=int, default=None, help="refresh last.ckpt every N steps mid-epoch")
    c.add_argument("--validate", action="store_true", help="run validation on --ckpt and exit")
    c.add_argument("--test", action="store_true", help="run the test split on --ckpt and exit")
    c.add_argument("--ckpt", default=None, help="checkpoint for --validate / --test ('last' = newest)")
    c.add_argument("--logger", choices=["wandb", "csv", "none"], default="wandb",
                   help="wandb (default; offline without key/network), csv or none")
    c.add_argument("--wandb-project", default=None, help="default: mamba-zoo-<model>")
    c.add_argument("--log-model", action="store_true", help="upload checkpoints to W&B as artifacts")
    c.add_argument("--progress", choices=["rich", "tqdm", "none"], default="rich")
    return p


def list_models() -> str:
    """One line per registered model: name, status, presets with parameter counts, summary."""
    from zoo.summary import count_parameters

    lines = []
    for name, entry in REGISTRY.items():
        if entry.status != "ready":
            lines.append(f"{name:<10} [{entry.status}] {entry.summary}")
            continue
        counts = []
        sizes = [p for p in entry.config.PRESETS if p != "published"]
        for preset in sizes:
            try:
                n = count_parameters(entry, preset)
                counts.append(f"{preset} {n / 1e6:.2f}M" if n < 1e9 else f"{preset} {n / 1e9:.2f}B")
            except Exception as e:  # a broken preset must not hide the others
                counts.append(f"{preset} ? ({type(e).__name__})")
        default = entry.config.DEFAULT_PRESET
        lines.append(f"{name:<10} {entry.summary}\n{'':<10} presets: {' | '.join(counts)} (default {default})")
    return "\n".join(lines)


def resolve_config(args: argparse.Namespace, entry, ckpt: dict[str, Any] | None):
    """Config = checkpoint's (when resuming) or defaults + presets, then flag shortcuts, then --set overrides."""
    if ckpt is not None:
        cfg = entry.config.from_dict(ckpt["hyper_parameters"]["config"], strict=False)
    else:
        cfg = entry.config.from_presets(args.preset)
    changes = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    cfg = cfg.replace(**changes)
    return cfg.with_overrides(args.overrides)


def make_run_dir(args: argparse.Namespace, entry, resume_path: Path | None) -> Path:
    from zoo.trainer import CHECKPOINT_ROOT

    if resume_path is not None:
        return resume_path.parent
    preset = (args.preset or entry.config.DEFAULT_PRESET or "default").replace(",", "+")
    name = args.run_name or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return CHECKPOINT_ROOT / entry.name / name


def run(argv: list[str] | None = None, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Parse `argv`, then train / validate / test. Returns the trainer, model, datamodule and run directory."""
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_models())
        return {}
    entry = get_entry(args.model)
    module_cls, dm_cls = entry.load("module"), entry.load("datamodule")

    import lightning as L

    from zoo.checkpoint import checkpoint_task, find_last, read_checkpoint
    from zoo.trainer import CHECKPOINT_ROOT, RunOptions, build_trainer

    resume_path = ckpt = None
    if args.resume:
        resume_path = find_last(entry.name, CHECKPOINT_ROOT) if args.resume == "last" else Path(args.resume)
        ckpt = read_checkpoint(resume_path)
        task = checkpoint_task(ckpt, resume_path)
        if task != entry.name:
            raise ZooError(f"--resume {resume_path} holds a '{task}' model, but --model is '{entry.name}'. "
                           f"Run `python train.py --model {task} --resume {resume_path}`.")
        print(f"[train] resuming {resume_path} at epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')}")
    eval_path = None
    if args.validate or args.test:
        if not args.ckpt:
            raise ZooError("--validate / --test need --ckpt PATH (or --ckpt last).")
        eval_path = find_last(entry.name, CHECKPOINT_ROOT) if args.ckpt == "last" else Path(args.ckpt)
        ckpt = read_checkpoint(eval_path)
        task = checkpoint_task(ckpt, eval_path)
        if task != entry.name:
            raise ZooError(f"--ckpt {eval_path} holds a '{task}' model, not '{entry.name}'. Use --model {task}.")

    cfg = resolve_config(args, entry, ckpt)
    if args.show_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return {"config": cfg}

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = dm_cls(cfg, data_dir=args.data_dir)
    datamodule.prepare_data()
    datamodule.setup("fit")
    data_fields = datamodule.config_overrides()
    if ckpt is None:
        cfg = cfg.replace(**data_fields)
    datamodule.cfg = cfg
    model = module_cls(config=cfg)

    run_dir = make_run_dir(args, entry, resume_path or (eval_path if eval_path else None))
    opts = RunOptions(
        model=entry.name, run_dir=run_dir, epochs=cfg.epochs, devices=args.devices, num_nodes=args.num_nodes,
        strategy=args.strategy, precision=args.precision, accumulate=cfg.accumulate, grad_clip=cfg.grad_clip,
        logger=args.logger, wandb_project=args.wandb_project, log_model=args.log_model,
        fast_dev_run=args.fast_dev_run, max_steps=args.max_steps, limit_train_batches=_limit(args.limit_train_batches),
        limit_val_batches=_limit(args.limit_val_batches), monitor=cfg.monitor, monitor_mode=cfg.monitor_mode,
        save_top_k=cfg.save_top_k, deterministic=args.deterministic, progress=args.progress,
        ckpt_every_n_steps=args.ckpt_every_n_steps if args.ckpt_every_n_steps is not None else cfg.ckpt_every_n_steps,
    )
    trainer = build_trainer(opts, {"model": entry.name, **cfg.to_dict()})
    for cb in extra_callbacks or []:
        trainer.callbacks.append(cb)

    if eval_path is not None:
        fn = trainer.test if args.test else trainer.validate
        results = fn(model, datamodule=datamodule, ckpt_path=str(eval_path), weights_only=False)
        return {"trainer": trainer, "model": model, "datamodule": datamodule, "results": results, "run_dir": run_dir}
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume_path) if resume_path else None,
                weights_only=False)
    if not args.fast_dev_run:
        print(f"[train] checkpoints in {run_dir} (last.ckpt, best-*.ckpt). Open one with "
              f"`{module_cls.__name__}.load_from_checkpoint(path)` or `python predict.py ... --ckpt PATH`.")
    return {"trainer": trainer, "model": model, "datamodule": datamodule, "run_dir": run_dir}


def _limit(x: float | None) -> float | int | None:
    return int(x) if x is not None and x > 1 else x


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except ZooError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
