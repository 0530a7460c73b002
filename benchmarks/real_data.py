#!/usr/bin/env python
"""A task on real data: the zoo's default against a size-matched timm CNN, same pipeline, same wall-clock budget,
both scored on the task's test split beside the task's floor.

    python benchmarks/real_data.py demansia2 ../shared/realdata/imagenette --budget-minutes 3
    python benchmarks/real_data.py face ../shared/realdata/att_orl_faces --budget-minutes 2
    python benchmarks/real_data.py agegender ../shared/realdata/utkface --budget-minutes 3
    python benchmarks/real_data.py hand ../shared/realdata/11k_hands --budget-minutes 3
    python benchmarks/real_data.py palm ../shared/realdata/palm_coep --budget-minutes 3

Each row is a `train.py` run (in this process, `--logger none`) stopped when its training time reaches the budget,
then `trainer.test` on the last weights. Rows per task:
- demansia2: the default network vs `--set backbone=test_resnet` (timm, 0.37M parameters; micro has 0.36M).
  A folder without train/ (Imagenette's val/ only) is split 80/20 per class into symlinked train/ and val/ folders.
- face: the default Mamba encoder vs `--set backbone=test_resnet`.
- agegender: the default (a timm CNN, resnet10t, 5M parameters) vs the zoo's Mamba backbone
  `--set backbone=demansia2_micro` (0.30M) and the timm CNN of its size, `--set backbone=test_resnet` (0.37M).
- hand: the default (VMamba micro U-Net, 0.59M parameters on the 11k Hands sample) vs `--set backbone=test_convnext`
  (the same decoder and heads on timm's test_convnext features, 0.56M), both with `protocol=open_set` (the closed-set
  protocol has no test split) and `skip_missing_images=true`: the test split is the held-out half of the subjects, so
  identity is scored by retrieval (rank-1, mAP; one gallery image per subject and aspect), gender and age group by
  accuracy.
- palm: the default (the library's Unet with VSS blocks, `mixer=vss`, 0.74M at micro) vs the library's own
  convolutional Unet with attention (`--set mixer=attention`, 0.72M); `test/loss` is the diffusion loss at fixed
  timesteps and noise, of the EMA weights.
Floors: chance and the majority class (classification), the trivial predictor (age/gender), raw-pixel cosine
retrieval on the test identities (face; with a pairs file also the pairs protocol on raw pixels, and under the table
the share of the majority answer); hand: the expected rank-1 and mAP of a random embedding under the same
gallery protocol, the majority gender and age group of the test split, and under the table the rank-1 of always
answering the most frequent subject and the rank-1 / mAP of the raw pixels (32x32, cosine; often near-duplicate
photos of one hand make this the floor that matters); palm: the same fixed-noise loss of a denoiser that outputs
zeros, and under the table that of the best constant output image fitted on the training split (a network that
learned only the mean). With
EMA (demansia2, palm) the test scores the EMA weights; demansia2's last validation EMA and raw top-1 are printed under
the table, which shows whether the average lags the raw weights.
demansia2's teacher rows (`--teacher-rows I,J`, `--no-teacher-rows`) train DeMansia 2 taught by the CNN row of the
same seed: on its token labels, and / or by DeiT's hard distillation (`--set distill=hard --set teacher=<its ckpt>`);
the teacher's time is printed beside the student's. `--skip-default` leaves out the default row.
`--row "LABEL=KEY=VALUE;KEY=VALUE"` adds a row with those `--set` overrides (e.g. to try a preset change), and
`--extra-rows-only` keeps only those. `--seeds N` runs every row with seeds 0..N-1, interleaved (seed 0 of every row,
then seed 1, ...) so that a drift in the machine's load touches every row alike, and prints mean +- standard
deviation over the seeds. The last line gives the load average: on a shared machine, compare rows of one run only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
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
    # The same DeMansia 2 taught by the test_resnet row of the same seed (its last weights as the teacher; token
    # labels and / or DeiT's hard distillation, `TEACHER_ROWS`): the recipes of docs/demansia2.md for small data.
    "face": [("default (Mamba encoder)", []), ("timm test_resnet", ["--set", "backbone=test_resnet"])],
    "agegender": [("default (timm resnet10t)", []), ("zoo demansia2_micro", ["--set", "backbone=demansia2_micro"]),
                  ("timm test_resnet", ["--set", "backbone=test_resnet"])],
    "hand": [("default (VMamba U-Net)", []), ("timm test_convnext", ["--set", "backbone=test_convnext"])],
    "palm": [("default (Unet + VSS)", []), ("Unet with attention", ["--set", "mixer=attention"])],
}
# (label, teacher row, --set overrides, what the teacher gives: token "labels" (made from its last weights into
# token_label_dir) and / or "distill" (DeiT's hard distillation: `--set teacher=<its last.ckpt>`, `distill=hard`)).
TEACHER_ROWS = {"demansia2": [
    ("DeMansia 2 + CNN token labels", "timm test_resnet", [], {"labels"}),  # LV-ViT: class token on the teacher's map
    ("+ labels, class token on label", "timm test_resnet", ["--set", "token_label_cls=label"], {"labels"}),
    ("+ labels, label cls, MixToken", "timm test_resnet", ["--set", "token_label_cls=label", "--set", "mix_token=true"],
     {"labels"}),
    ("DeMansia 2 + hard distillation", "timm test_resnet", ["--set", "distill=hard"], {"distill"}),
    ("+ labels (label cls) + hard distillation", "timm test_resnet", ["--set", "token_label_cls=label",
                                                                        "--set", "distill=hard"], {"labels", "distill"}),
]}
# Applied to every row of the task (before the command line's --set): the protocol with a test split, and the real
# 11k Hands samples name more images in HandInfo.csv than they hold.
TASK_SETS = {"hand": ["--set", "protocol=open_set", "--set", "skip_missing_images=true"]}
METRICS = {
    "demansia2": ["test/top1", "test/top5"],
    "face": ["test/rank1", "test/r_precision", "test/mean_average_precision_at_r", "test/verif_acc"],
    "agegender": ["test/age_mae", "test/gender_acc"],
    "hand": ["test/rank1", "test/mAP", "test/gender_acc", "test/age_acc"],
    "palm": ["test/loss"],
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
    if task == "hand":
        ds = dm.dataset("test")
        return {**hand_floor(ds.items), **raw_pixel_retrieval(ds, dm.cfg.gallery_draws, dm.cfg.split_seed)}
    if task == "palm":
        return palm_floor(dm)
    from models.face.metrics import retrieval_metrics

    ds = dm.dataset("test")
    images = torch.stack([ds[i][0] for i in range(len(ds))]).flatten(1)
    labels = torch.tensor(ds.labels)
    emb = torch.nn.functional.normalize(images - images.mean(1, keepdim=True), dim=1)
    out = {f"test/{k}": v for k, v in retrieval_metrics(emb, labels).items()}
    if dm.pairs:  # the pairs protocol on raw pixels (same folds and threshold rule), and its majority answer
        from models.face.metrics import verify_pairs

        pds = dm.pairs_dataset()
        pixels = torch.stack([pds[i][0] for i in range(len(pds))]).flatten(1)
        out["test/verif_acc"] = float(verify_pairs(pixels - pixels.mean(1, keepdim=True), dm.pair_images,
                                                   dm.pairs).mean)
        same = float(np.mean([p.same for p in dm.pairs]))
        out["verification, always the majority answer"] = max(same, 1.0 - same)
    return out


def hand_floor(items) -> dict[str, float]:
    """Floors of the hand test split from its items (`HandItem`s). Retrieval as `protocol_tables` scores it: per aspect
    one gallery image per subject and the other images as queries (the aspects pooled when none has a query); a random
    embedding ranks a query's subject uniformly among the G gallery subjects (expected rank-1 1/G, AP H_G / G), and
    "majority subject (rank-1)" always answers each gallery's most frequent subject. Gender and age group: the share
    of the most frequent class."""
    persons, aspects = [it.person for it in items], [it.aspect for it in items]
    per_aspect = [Counter(p for p, a in zip(persons, aspects) if a == g) for g in sorted(set(aspects))]
    if sum(sum(c.values()) - len(c) for c in per_aspect) == 0:
        per_aspect = [Counter(persons)]
    r1 = ap = majority = queries = 0.0
    for counts in per_aspect:
        gallery, q = len(counts), sum(counts.values()) - len(counts)
        r1 += q / gallery
        ap += q * sum(1.0 / k for k in range(1, gallery + 1)) / gallery
        majority += counts.most_common(1)[0][1] - 1
        queries += q
    nan = float("nan")
    out = {"test/rank1": r1 / queries if queries else nan, "test/mAP": ap / queries if queries else nan}
    for key, values in (("test/gender_acc", [it.gender for it in items]), ("test/age_acc", [it.age for it in items])):
        out[key] = Counter(values).most_common(1)[0][1] / len(values)
    out["majority subject (rank-1)"] = majority / queries if queries else nan
    return out


def raw_pixel_retrieval(ds, draws: int, seed: int, size: int = 32) -> dict[str, float]:
    """Rank-1 and mAP of the hand test images themselves (pooled to size x size, centred, cosine) under the module's
    gallery protocol: the images of one subject and aspect are often near-duplicates, which chance does not show."""
    from models.hand.metrics import open_set_metrics

    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    emb = torch.nn.functional.adaptive_avg_pool2d(images, size).flatten(1)
    emb = emb - emb.mean(1, keepdim=True)
    persons = torch.tensor([it.person for it in ds.items])
    aspects = torch.tensor([it.aspect for it in ds.items])
    r = open_set_metrics(emb, persons, aspects, draws, seed)
    if r["rank1"] != r["rank1"]:  # no aspect has a query: pooled, as protocol_tables does
        r = open_set_metrics(emb, persons, None, draws, seed)
    return {"raw-pixel cosine (rank-1)": r["rank1"], "raw-pixel cosine (mAP)": r["mAP"]}


class ConstantDenoiser(torch.nn.Module):
    """A denoiser whose output is one fixed (C, H, W) image whatever (x, t): zeros by default."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.value = torch.nn.Parameter(torch.zeros(shape))

    def forward(self, x, t, x_self_cond=None):
        return self.value.expand_as(x)


def mean_fixed_loss(module, diffusion, batches: list, seeds: list[int]) -> torch.Tensor:
    """`module.fixed_loss` over (images, labels) batches, batch b at seeds[b], averaged per image (as Lightning
    averages the test step's logged loss, weighted by batch size)."""
    total = sum(module.fixed_loss(diffusion, images, s) * len(images) for (images, _), s in zip(batches, seeds))
    return total / sum(len(images) for images, _ in batches)


def best_constant(module, diffusion, batches: list, seeds: list[int]) -> torch.Tensor:
    """The fixed output image (C, H, W) that minimises `mean_fixed_loss` over `batches`. The loss is quadratic in a
    constant output c, L(c) = L(0) + <g, c> + s |c|^2 (s: the mean loss weight over the elements), so the gradient g
    at 0 and L(1) give the minimum c* = -g / 2s. Leaves `diffusion.model` a `ConstantDenoiser` holding c*."""
    denoiser = ConstantDenoiser((3, *diffusion.image_size))
    diffusion.model = denoiser
    at_zero = mean_fixed_loss(module, diffusion, batches, seeds)
    (grad,) = torch.autograd.grad(at_zero, denoiser.value)
    with torch.no_grad():
        denoiser.value.fill_(1.0)
        s = (mean_fixed_loss(module, diffusion, batches, seeds) - at_zero - grad.sum()) / grad.numel()
        denoiser.value.copy_(-grad / (2 * s))
    return denoiser.value.detach()


def palm_floor(dm, fit_samples: int = 256) -> dict[str, float]:
    """Floors of palm's `test/loss` (the module's `fixed_loss` at the test step's seeds and batches): a denoiser that
    outputs zeros, and "best constant output, fitted on train (loss)": the one fixed output image that minimises the
    same loss on the training split (every training image under ceil(fit_samples / n) noise draws), what a network
    that learned only the mean target would score. Fitting the constant on the few test images themselves would
    memorise their noise draws, not measure anything."""
    from models.palm.module import PalmDiffusion

    module = PalmDiffusion(config=dm.cfg)
    diffusion, seed = module.net, int(dm.cfg.seed) * 100_003
    test = list(dm.test_dataloader())
    test_seeds = [seed + b for b in range(len(test))]
    with torch.random.fork_rng():  # the training split's random flips, without touching the caller's generator
        torch.manual_seed(seed)
        train = list(dm.loader(dm.dataset("train"), train=False))
    train *= max(1, -(-fit_samples // sum(len(images) for images, _ in train)))
    best_constant(module, diffusion, train, [seed + 50_000 + b for b in range(len(train))])
    with torch.no_grad():
        best = float(mean_fixed_loss(module, diffusion, test, test_seeds))
        diffusion.model.value.zero_()
        zero = float(mean_fixed_loss(module, diffusion, test, test_seeds))
    return {"test/loss": zero, "best constant output, fitted on train (loss)": best}


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
    n = model.parameter_count()  # without a weight copy (palm's EMA)
    return {"params": n, "epochs": budget.epochs, "seconds": budget.elapsed, "metrics": metrics, "dm": dm,
            "last_val": last_val, "ckpt": trainer.checkpoint_callback.last_model_path}


def make_labels(ckpt: str, data_dir: Path, out: Path) -> float:
    """Token labels of `data_dir`'s train split by the classifier in `ckpt`; returns the seconds it took."""
    from models.demansia2.token_labels import load_teacher, make_token_labels

    start = time.perf_counter()
    make_token_labels(load_teacher(ckpt), data_dir, out, progress=False)
    return time.perf_counter() - start


def summarise(values: list[float], fmt: str = ".3f") -> str:
    """One value as is; several as mean +- sample standard deviation; none as '-'."""
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(np.mean(values), fmt)} +- {format(np.std(values, ddof=1), fmt)}"


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
    p.add_argument("--seeds", type=int, default=1, help="seeds per row (0..N-1), rows interleaved (default 1)")
    p.add_argument("--no-teacher-rows", action="store_true", help="demansia2: skip the rows taught by the CNN row "
                   "(its token labels, hard distillation)")
    p.add_argument("--teacher-rows", default=None, metavar="I,J", help="demansia2: only these teacher rows (0-based)")
    p.add_argument("--skip-default", action="store_true", help="leave out the default row (the first one)")
    args = p.parse_args(argv)
    rows_spec = [] if args.extra_rows_only else list(ROWS[args.task])
    teacher_rows = [] if args.extra_rows_only or args.no_teacher_rows else TEACHER_ROWS.get(args.task, [])
    if args.teacher_rows is not None:
        teacher_rows = [teacher_rows[int(i)] for i in args.teacher_rows.split(",")]
    if args.skip_default:
        rows_spec = rows_spec[1:]
    for spec in args.row:
        label, _, sets = spec.partition("=")
        rows_spec.append((label, [a for kv in sets.split(";") if kv.strip() for a in ("--set", kv.strip())]))

    common = ["--num-workers", str(args.num_workers), *TASK_SETS.get(args.task, [])]
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
        runs: dict[str, list[dict]] = {name: [] for name, _ in rows_spec}
        runs.update({name: [] for name, _, _, _ in teacher_rows})
        for seed in range(args.seeds):
            for name, extra in rows_spec:
                print(f"\n=== {args.task}: {name}, seed {seed} ===", flush=True)
                runs[name].append(run_row(args.task, data_dir, [*extra, "--seed", str(seed)], args.preset,
                                          60 * args.budget_minutes, common))
            for name, teacher_row, extra, uses in teacher_rows:
                print(f"\n=== {args.task}: {name}, seed {seed} (teacher: {teacher_row}) ===", flush=True)
                ckpt, label_s, sets = runs[teacher_row][-1]["ckpt"], 0.0, []
                if "labels" in uses:
                    labels = Path(tmp) / f"token-labels-seed{seed}"
                    label_s = make_labels(ckpt, data_dir, labels)
                    sets += ["--set", f"token_label_dir={labels}"]
                if "distill" in uses:
                    sets += ["--set", f"teacher={ckpt}"]
                row = run_row(args.task, data_dir, [*extra, "--seed", str(seed), *sets], args.preset,
                              60 * args.budget_minutes, common)
                row["teacher_seconds"] = runs[teacher_row][-1]["seconds"] + label_s
                runs[name].append(row)
        # The split may follow the seed (face, agegender): the floor is taken on each seed's test split and averaged.
        floors = [floor(args.task, r["dm"]) for r in runs[rows_spec[0][0]]]
        base = {k: float(np.mean([f[k] for f in floors])) for k in floors[0]}

    rows = [(name, rs[0]) for name, rs in runs.items()]
    keys = [k for k in METRICS[args.task] if any(k in r["metrics"] for _, r in rows)]
    header = f"| {'model':<26} | params | epochs | train s | " + " | ".join(k.removeprefix("test/") for k in keys) + " |"
    lines = [header, "|" + "---|" * (4 + len(keys))]
    for name, rs in runs.items():
        vals = " | ".join(summarise([r["metrics"][k] for r in rs if k in r["metrics"]]) for k in keys)
        epochs = summarise([r["epochs"] for r in rs], ".1f" if len(rs) > 1 else ".0f")
        seconds = np.mean([r["seconds"] for r in rs])
        lines.append(f"| {name:<26} | {rs[0]['params'] / 1e6:.2f}M | {epochs} | {seconds:.0f} | {vals} |")
    floor_vals = " | ".join(f"{base[k]:.3f}" if k in base else "-" for k in keys)
    floor_name = {"demansia2": "chance", "agegender": "trivial predictor", "face": "raw-pixel cosine",
                  "hand": "chance / majority", "palm": "zero denoiser"}[args.task]
    lines.append(f"| floor: {floor_name:<19} | - | - | - | {floor_vals} |")
    for name, rs in runs.items():
        if "teacher_seconds" in rs[0]:
            lines.append(f"\n{name}: the teacher's training (and labelling) took "
                         f"{np.mean([r['teacher_seconds'] for r in rs]):.0f} s before the student's "
                         f"{np.mean([r['seconds'] for r in rs]):.0f} s")
    for name, r in rows:
        if "val/top1_raw" in r["last_val"]:
            lines.append(f"\n{name}: last validation top-1 {r['last_val']['val/top1']:.3f} with the EMA weights "
                         f"(scored above), {r['last_val']['val/top1_raw']:.3f} with the raw weights")
    for k in (k for k in base if k not in METRICS[args.task]):  # floors without a column of their own
        lines.append(f"\n{k} on the test split: {base[k]:.3f}")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    seeds = f", {args.seeds} seeds (mean +- sd)" if args.seeds > 1 else ""
    print(f"\n{args.task} on {args.data_dir}, budget {args.budget_minutes} min per row{seeds}, preset {args.preset}, "
          f"load average at the end {load} on {os.cpu_count()} CPUs\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
