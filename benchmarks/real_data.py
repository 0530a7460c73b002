#!/usr/bin/env python
"""A task on real data: the zoo's default against a size-matched timm CNN, same pipeline, same wall-clock budget,
both scored on the task's test split beside the task's floor.

    python benchmarks/real_data.py demansia2 ../shared/realdata/imagenette --budget-minutes 3
    python benchmarks/real_data.py face ../shared/realdata/att_orl_faces --budget-minutes 2
    python benchmarks/real_data.py agegender ../shared/realdata/utkface --budget-minutes 3

Each row is a `train.py` run (in this process, `--logger none`) stopped when its training time reaches the budget,
then `trainer.test` on the last weights. Rows per task:
- demansia2: the default network vs `--set backbone=test_resnet` (timm, 0.37M parameters; micro has 0.29M).
  A folder without train/ (Imagenette's val/ only) is split 80/20 per class into symlinked train/ and val/ folders.
- face: the default Mamba encoder vs `--set backbone=test_resnet`.
- agegender: the default (a timm CNN, resnet10t) vs the zoo's Mamba backbone `--set backbone=demansia2_micro`.
Floors: chance and the majority class (classification), the trivial predictor (age/gender), raw-pixel cosine
retrieval on the test identities (face). With EMA (demansia2) the test scores the EMA weights; the last validation's
EMA and raw top-1 are printed under the table, which shows whether the average lags the raw weights.
`--row "LABEL=KEY=VALUE;KEY=VALUE"` adds a row with those `--set` overrides (e.g. to try a preset change), and
`--extra-rows-only` keeps only those. The last line gives the load average: on a shared machine, compare rows of one
run only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROWS = {
    "demansia2": [("default (DeMansia 2)", []), ("timm test_resnet", ["--set", "backbone=test_resnet"])],
    "face": [("default (Mamba encoder)", []), ("timm test_resnet", ["--set", "backbone=test_resnet"])],
    "agegender": [("default (timm resnet10t)", []), ("zoo demansia2_micro", ["--set", "backbone=demansia2_micro"])],
}
METRICS = {
    "demansia2": ["test/top1", "test/top5"],
    "face": ["test/precision_at_1", "test/r_precision", "test/mean_average_precision_at_r", "test/verif_acc"],
    "agegender": ["test/age_mae", "test/gender_acc"],
}


class TimeBudget(L.Callback):
    """Stops training once `seconds` of training (validation included) have passed; records epochs and time."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.epochs, self.elapsed = seconds, 0.0, 0, 0.0

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if time.perf_counter() - self.start > self.seconds:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs = trainer.current_epoch + 1
        self.elapsed = time.perf_counter() - self.start


def imagefolder_split(data_dir: Path, work: Path, val_fraction: float = 0.2) -> Path:
    """`data_dir` itself when it has train/ and val/; otherwise a train/val split (per class, seeded) of its one split
    folder (or of its class folders), as symlinks under `work`."""
    if (data_dir / "train").is_dir() and (data_dir / "val").is_dir():
        return data_dir
    src = next((data_dir / s for s in ("val", "train") if (data_dir / s).is_dir()), data_dir)
    rng = np.random.default_rng(0)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.is_file())
        order = rng.permutation(len(files))
        n_val = max(1, round(val_fraction * len(files)))
        for k, i in enumerate(order):
            dst = work / ("val" if k < n_val else "train") / cls.name / files[i].name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(files[i].resolve())
    return work


def floor(task: str, dm) -> dict[str, float]:
    """What a model must beat on the test split, without training."""
    if task == "demansia2":
        labels = np.array([c for _, c in dm.val_index.samples])
        return {"test/top1": 1.0 / len(dm.train_index.classes),
                "majority class": float(np.bincount(labels).max() / len(labels))}
    if task == "agegender":
        b = dm.baseline("test")
        return {"test/age_mae": b["age_mae"], "test/gender_acc": b["gender_acc"]}
    from models.face.metrics import retrieval_metrics

    ds = dm.dataset("test")
    images = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    labels = torch.tensor(ds.labels)
    emb = torch.nn.functional.normalize(images - images.mean(1, keepdim=True), dim=1)
    return {f"test/{k}": v for k, v in retrieval_metrics(emb, labels).items()}


def run_row(task: str, data_dir: Path, extra: list[str], preset: str, budget_s: float, common: list[str]) -> dict:
    import train

    budget = TimeBudget(budget_s)
    argv = ["--model", task, "--data-dir", str(data_dir), "--preset", preset, "--logger", "none", "--progress",
            "none", "--run-name", f"bench-real-{task}-{int(time.time())}", *common, *extra]
    out = train.run(argv, extra_callbacks=[budget])
    trainer, model, dm = out["trainer"], out["model"], out["datamodule"]
    # The last validation, before `test` replaces the callbacks: with EMA, its weights (val/top1) and the raw ones.
    last_val = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/top1", "val/top1_raw")}
    results = trainer.test(model, datamodule=dm, verbose=False)
    metrics = {}
    for r in results:
        metrics.update({k.split("/dataloader_idx")[0]: float(v) for k, v in r.items()})
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "epochs": budget.epochs, "seconds": budget.elapsed, "metrics": metrics, "dm": dm,
            "last_val": last_val}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(ROWS))
    p.add_argument("data_dir", type=Path)
    p.add_argument("--budget-minutes", type=float, default=3.0, help="training wall clock per row (default 3)")
    p.add_argument("--preset", default="micro", help="preset of every row (default micro: a CPU budget)")
    p.add_argument("--epochs", type=int, default=None, help="schedule length (default: the preset's); the budget "
                   "may stop a run earlier")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every row (e.g. image_size=64)")
    p.add_argument("--row", action="append", default=[], metavar="LABEL=KEY=VALUE;KEY=VALUE",
                   help="one more row: a label and its --set overrides separated by ';' (e.g. "
                        "\"16 tokens=patch_size=8;mix_token=false\"); repeatable")
    p.add_argument("--extra-rows-only", action="store_true", help="only the --row rows (no default and CNN rows)")
    p.add_argument("--num-workers", type=int, default=2)
    args = p.parse_args(argv)
    rows_spec = [] if args.extra_rows_only else list(ROWS[args.task])
    for spec in args.row:
        label, _, sets = spec.partition("=")
        rows_spec.append((label, [a for kv in sets.split(";") if kv.strip() for a in ("--set", kv.strip())]))

    common = ["--num-workers", str(args.num_workers)]
    if args.epochs:
        common += ["--epochs", str(args.epochs)]
    for kv in args.overrides:
        common += ["--set", kv]
    with tempfile.TemporaryDirectory() as tmp:
        import zoo.trainer

        zoo.trainer.CHECKPOINT_ROOT = Path(tmp) / "checkpoints"  # the rows' checkpoints go with the temporary folder
        data_dir = args.data_dir.expanduser().resolve()
        if args.task == "demansia2":
            data_dir = imagefolder_split(data_dir, Path(tmp))
        rows = []
        for name, extra in rows_spec:
            print(f"\n=== {args.task}: {name} ===", flush=True)
            rows.append((name, run_row(args.task, data_dir, extra, args.preset, 60 * args.budget_minutes, common)))
        base = floor(args.task, rows[0][1]["dm"])

    keys = [k for k in METRICS[args.task] if any(k in r["metrics"] for _, r in rows)]
    header = f"| {'model':<26} | params | epochs | train s | " + " | ".join(k.removeprefix("test/") for k in keys) + " |"
    lines = [header, "|" + "---|" * (4 + len(keys))]
    for name, r in rows:
        vals = " | ".join(f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "-" for k in keys)
        lines.append(f"| {name:<26} | {r['params'] / 1e6:.2f}M | {r['epochs']} | {r['seconds']:.0f} | {vals} |")
    floor_vals = " | ".join(f"{base[k]:.3f}" if k in base else "-" for k in keys)
    floor_name = {"demansia2": "chance", "agegender": "trivial predictor", "face": "raw-pixel cosine"}[args.task]
    lines.append(f"| floor: {floor_name:<19} | - | - | - | {floor_vals} |")
    for name, r in rows:
        if "val/top1_raw" in r["last_val"]:
            lines.append(f"\n{name}: last validation top-1 {r['last_val']['val/top1']:.3f} with the EMA weights "
                         f"(scored above), {r['last_val']['val/top1_raw']:.3f} with the raw weights")
    if "majority class" in base:
        lines.append(f"\nmajority class on the test split: {base['majority class']:.3f}")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{args.task} on {args.data_dir}, budget {args.budget_minutes} min per row, preset {args.preset}, "
          f"load average at the end {load} on {os.cpu_count()} CPUs\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
