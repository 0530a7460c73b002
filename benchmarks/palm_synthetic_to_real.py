#!/usr/bin/env python
"""Synthetic-to-real: does a generated palm set train a recogniser that works on real palms?

The protocol of the palm-synthesis papers (RPG-Palm, ICCV 2023; Diff-Palm, CVPR 2025), at the zoo's scale:
1. a palm diffusion checkpoint (`--palm-ckpt`, or one trained here on `--palm-data` / the demo palms);
2. generate M individuals x N variations (`predict.py generate`);
3. train the face task's embedding network on them with the same `train.py --model face --data-dir GENERATED`;
4. beside it, the same network trained on real palms only (`--real-train`, or the first half of `--real`'s people);
5. open-set evaluation on real people never trained on (`--real`'s other half, or all of `--real` with
   `--real-train`): rank-1 identification (first image of each person = gallery, the rest = probes) and verification
   AUC / EER over every pair; and the identity consistency of the generated set itself in each recogniser.

    python benchmarks/palm_synthetic_to_real.py --real /work/shared/realdata/palm_coep --threads 1
    python benchmarks/palm_synthetic_to_real.py --palm-ckpt checkpoints/palm/<run>/last.ckpt --real REAL_TEST \
        --real-train REAL_TRAIN --individuals 200 --per-individual 10 --face-preset tiny --face-epochs 40

Prints one table; every number is from this run (nothing cached).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", required=True, help="real palms, one folder per person (evaluation people)")
    p.add_argument("--real-train", default=None, help="real palms of other people for the real-only baseline "
                   "(default: the first half of --real's people; the other half is evaluated)")
    p.add_argument("--palm-ckpt", default=None, help="palm checkpoint (default: train one here)")
    p.add_argument("--palm-data", default=None, help="images to train the palm model on (default: demo palms)")
    p.add_argument("--palm-preset", default="micro")
    p.add_argument("--palm-steps", type=int, default=300, help="optimizer steps when training the palm model here")
    p.add_argument("--individuals", type=int, default=16)
    p.add_argument("--per-individual", type=int, default=6)
    p.add_argument("--variation", type=float, default=0.35)
    p.add_argument("--method", default="renoise", choices=["renoise", "shared-noise"])
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    p.add_argument("--face-preset", default="micro")
    p.add_argument("--face-epochs", type=int, default=10)
    p.add_argument("--face-batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64, help="recogniser input size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--work", default=None, help="keep the generated set and runs here (default: a temp folder)")
    return p.parse_args(argv)


def people(folder: Path) -> dict[str, list[Path]]:
    from datamodules.palms import scan_palms

    scan = scan_palms(folder)
    out: dict[str, list[Path]] = {}
    for path, person in scan.items:
        out.setdefault(person, []).append(path)
    return out


def link_people(src: dict[str, list[Path]], names: list[str], dst: Path) -> Path:
    """A folder per person of the chosen people (symlinks), so train.py / the metrics read them as they are."""
    for name in names:
        (dst / name).mkdir(parents=True, exist_ok=True)
        for p in src[name]:
            (dst / name / p.name).symlink_to(p.resolve())
    return dst


def train_face(data: Path, run_name: str, args) -> object:
    import train

    out = train.run(["--model", "face", "--preset", args.face_preset, "--data-dir", str(data), "--epochs",
                     str(args.face_epochs), "--batch-size", str(args.face_batch_size), "--set",
                     f"image_size={args.image_size}", "--set", "num_workers=0", "--seed", str(args.seed),
                     "--logger", "none", "--progress", "none", "--run-name", run_name])
    return out["model"].eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import zoo.trainer
    from models.palm.verbs import generate, identity_report
    from zoo.checkpoint import load_model

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="palm-s2r-"))
    work.mkdir(parents=True, exist_ok=True)
    zoo.trainer.CHECKPOINT_ROOT = work / "checkpoints"
    t0 = time.time()

    # 1. the generator
    if args.palm_ckpt:
        palm = load_model(args.palm_ckpt, expected_task="palm")
        palm_desc = args.palm_ckpt
    else:
        import train

        flags = ["--data-dir", args.palm_data] if args.palm_data else []
        out = train.run(["--model", "palm", "--preset", args.palm_preset, "--max-steps", str(args.palm_steps),
                         "--set", "num_workers=0", "--set", "grid_every_n_steps=0", "--seed", str(args.seed),
                         "--logger", "none", "--progress", "none", "--run-name", "palm", *flags])
        palm = out["model"].eval()
        palm_desc = f"{args.palm_preset}, {args.palm_steps} steps on {args.palm_data or 'demo palms'}"

    # 2. the synthetic set
    gen = work / "generated"
    shutil.rmtree(gen, ignore_errors=True)
    generate(palm, gen, args.individuals, args.per_individual, seed=args.seed, steps=args.steps,
             variation=args.variation, method=args.method, progress=False)

    # 3-4. the two recognisers
    real = people(Path(args.real))
    if args.real_train:
        test_dir, train_dir = Path(args.real), Path(args.real_train)
    else:
        names = sorted(real)
        half = len(names) // 2
        train_dir = link_people(real, names[:half], work / "real_train")
        test_dir = link_people(real, names[half:], work / "real_test")
    synthetic_face = train_face(gen, "face-synthetic", args)
    real_face = train_face(train_dir, "face-real", args)

    # 5. evaluation on unseen real people
    rows = []
    for name, model in (("face on synthetic", synthetic_face), ("face on real only", real_face)):
        r = identity_report(model, test_dir)
        g = identity_report(model, gen)
        rows.append((name, r, g))
    n_test = people(test_dir)
    print(f"\nPalm generator: {palm_desc}; {args.individuals} x {args.per_individual} generated "
          f"({args.method}, variation {args.variation}); face preset {args.face_preset}, {args.face_epochs} epochs, "
          f"{args.image_size} px; real evaluation: {len(n_test)} people, {sum(map(len, n_test.values()))} images "
          f"({test_dir}); {time.time() - t0:.0f} s\n")
    print("| recogniser | real rank-1 | real AUC | real EER | generated-set AUC | generated-set EER |")
    print("|---|---|---|---|---|---|")
    for name, r, g in rows:
        print(f"| {name} | {r['rank1']:.3f} | {r['auc']:.3f} | {r['eer']:.3f} | {g['auc']:.3f} | {g['eer']:.3f} |")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
