#!/usr/bin/env python
"""EMA decay warm-up vs the published constant decay: validation top-1 of the EMA weights per epoch, DeMansia 2 on the
built-in demo data (or --data-dir), the same seed and data order for both runs.

    python benchmarks/ema_warmup.py [--epochs 5] [--preset micro] [--data-dir D] [--decay 0.99]

Prints one row per epoch: EMA top-1 with warm-up (our default), with the constant decay (published), and the raw
weights' top-1 (identical in both runs, since the EMA does not feed back into training).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402


class Curve(L.Callback):
    def __init__(self):
        self.rows = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            m = trainer.callback_metrics
            self.rows.append((float(m["val/top1"]), float(m.get("val/top1_raw", float("nan")))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--preset", default="micro")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--decay", type=float, default=None, help="EMA decay (default: the preset's)")
    args = p.parse_args()
    curves = {}
    for warmup in (True, False):
        cb = Curve()
        argv = ["--model", "demansia2", "--preset", args.preset, "--epochs", str(args.epochs), "--logger", "none",
                "--progress", "none", "--run-name", f"ema-warmup-{warmup}", "--set", f"ema_warmup={warmup}"]
        argv += ["--data-dir", args.data_dir] if args.data_dir else []
        argv += ["--set", f"ema_decay={args.decay}"] if args.decay else []
        train.run(argv, extra_callbacks=[cb])
        curves[warmup] = cb.rows
    print("\n| epoch | EMA top-1, warm-up (default) | EMA top-1, constant decay (published) | raw top-1 |")
    print("|---|---|---|---|")
    for i, ((w, raw), (c, _)) in enumerate(zip(curves[True], curves[False])):
        print(f"| {i} | {w:.3f} | {c:.3f} | {raw:.3f} |")


if __name__ == "__main__":
    main()
