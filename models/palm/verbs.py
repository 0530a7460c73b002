"""`predict.py` verbs of the palm task: generate, evaluate (identity consistency), quality (FID / KID)."""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zoo.commands import Command
from zoo.errors import ZooError
from zoo.images import load_rgb

EMBEDDING_TASKS = ("face", "hand")


def person_name(i: int) -> str:
    """Folder name of generated individual `i` (sorts in order)."""
    return f"id_{i:05d}"


# ----- generate -----
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--individuals", type=int, required=True, help="M synthetic individuals")
    p.add_argument("--per-individual", type=int, required=True, help="N images of each")
    p.add_argument("--out", required=True, help="folder to write <out>/<individual>/<k>.png into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's sampling_steps)")
    p.add_argument("--variation", type=float, default=0.35, help="how far an individual's images may move, 0..1 "
                   "(0 = identical images; default 0.35)")
    p.add_argument("--method", choices=["renoise", "shared-noise"], default="renoise",
                   help="renoise: re-noise a base palm part of the way and denoise again (default); shared-noise: "
                        "Diff-Palm's shared initial and late-step noise")
    p.add_argument("--batch-size", type=int, default=16, help="images per denoiser call")
    p.add_argument("--raw-weights", action="store_true", help="sample from the raw (non-EMA) weights")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that already holds files")


def _check_generate_args(args) -> Path:
    if args.individuals < 1 or args.per_individual < 1:
        raise ZooError(f"--individuals {args.individuals} --per-individual {args.per_individual}: both must be >= 1.")
    if not 0.0 <= args.variation <= 1.0:
        raise ZooError(f"--variation {args.variation}: must be between 0 (identical images) and 1.")
    if args.steps is not None and args.steps < 1:
        raise ZooError(f"--steps {args.steps}: must be >= 1.")
    if args.batch_size < 1:
        raise ZooError(f"--batch-size {args.batch_size}: must be >= 1.")
    out = Path(args.out).expanduser()
    if out.is_file():
        raise ZooError(f"--out {out} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ZooError(f"--out {out} already holds files; a generated set must not mix with other images. Give an "
                       f"empty or new folder, or add --overwrite.")
    return out


def generate(model, out: str | Path, individuals: int, per_individual: int, seed: int = 0, steps: int | None = None,
             variation: float = 0.35, method: str = "renoise", batch_size: int = 16, raw: bool = False,
             progress: bool = True) -> list[Path]:
    """Write `individuals` x `per_individual` PNGs to out/<id_XXXXX>/<k>.png (the people layout the zoo's recognisers
    read) and out/.generation.json (the settings); returns the paths written."""
    from tqdm.auto import tqdm

    out = Path(out)
    sampler = model.identity_sampler(steps, variation, method, seed, batch_size, raw)
    bar = tqdm(total=sampler.model_calls(individuals, per_individual), desc="generating palms", unit="step",
               disable=not progress)
    written = []
    with torch.no_grad():
        for i, images in sampler.generate(individuals, per_individual, progress=bar.update):
            folder = out / person_name(i)
            folder.mkdir(parents=True, exist_ok=True)
            arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
            for k, a in enumerate(arrays):
                path = folder / f"{k}.png"
                Image.fromarray(a).save(path)
                written.append(path)
    bar.close()
    (out / ".generation.json").write_text(json.dumps(
        {"individuals": individuals, "per_individual": per_individual, "seed": seed, "steps": sampler.steps,
         "variation": variation, "method": method, "raw_weights": raw, "image_size": model.cfg.image_size}, indent=2))
    return written


def _generate(model, args) -> int:
    out = _check_generate_args(args)
    if not args.raw_weights:
        _ = model.ema_diffusion  # the clear error when the checkpoint has no EMA weights
    written = generate(model.to(args.device), out, args.individuals, args.per_individual, args.seed, args.steps,
                       args.variation, args.method, args.batch_size, args.raw_weights)
    print(f"wrote {len(written)} images of {args.individuals} individuals to {out}/<individual>/<k>.png "
          f"({model.cfg.image_size} px, {args.method}, variation {args.variation}, seed {args.seed}). Train a "
          f"recogniser on it: python train.py --model face --data-dir {out}")
    return 0


# ----- evaluate: identity consistency of a generated set -----
def load_recognizer(path: str | Path, device: str = "cpu"):
    """A zoo embedding checkpoint (a task whose model has `embed`), or a ZooError naming the task it holds."""
    from zoo.checkpoint import checkpoint_task, load_model, read_checkpoint

    task = checkpoint_task(read_checkpoint(path), path)
    if task == "palm" or not task:
        raise ZooError(f"--recognizer {path} holds a '{task}' model, which embeds nothing. Give an embedding "
                       f"checkpoint of the {' or '.join(EMBEDDING_TASKS)} task (train one: python train.py --model face).")
    model = load_model(path, map_location=device)
    if not hasattr(model, "embed"):
        raise ZooError(f"--recognizer {path} holds a '{task}' model, which has no embeddings. Give a checkpoint of "
                       f"the {' or '.join(EMBEDDING_TASKS)} task.")
    return model


def embed_paths(recognizer, paths: list[Path], batch_size: int = 64) -> torch.Tensor:
    """Embeddings (N, D) of image files with the recogniser's own preprocessing (its task's `embed_items` in
    models/<task>/verbs.py), else resize to its image_size and scale to [-1, 1]."""
    try:
        own = getattr(importlib.import_module(f"models.{recognizer.TASK}.verbs"), "embed_items", None)
    except ImportError:
        own = None
    if own is not None:
        return own(recognizer, paths, batch_size)
    from datamodules.palms import resize_center_crop

    size = int(recognizer.cfg.image_size)
    chunks = []
    for i in range(0, len(paths), batch_size):
        x = np.stack([resize_center_crop(load_rgb(p), size) for p in paths[i:i + batch_size]])
        chunks.append(recognizer.embed(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0))
    return torch.cat(chunks)


def identity_report(recognizer, folder: str | Path, batch_size: int = 64) -> dict:
    """Identity metrics of a folder per person (models.palm.metrics.identity_metrics + rank-1)."""
    from datamodules.palms import scan_palms
    from models.palm.metrics import identity_metrics, rank1_identification

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ZooError(f"{root} is not a folder. Expected one sub-folder per individual: <folder>/<person>/<image>.")
    scan = scan_palms(root)
    names = scan.identities
    counts = {n: sum(1 for _, p in scan.items if p == n) for n in names}
    if len(names) < 2 or max(counts.values(), default=0) < 2:
        raise ZooError(f"{root}: {len(names)} individual(s), at most {max(counts.values(), default=0)} image(s) each; "
                       f"identity metrics need >= 2 individuals and one with >= 2 images (<folder>/<person>/<image>).")
    index = {n: i for i, n in enumerate(names)}
    paths = [p for p, _ in scan.items]
    labels = torch.tensor([index[n] for _, n in scan.items])
    emb = embed_paths(recognizer, paths, batch_size)
    return {"folder": str(root), "images": len(paths), "individuals": len(names), **identity_metrics(emb, labels),
            "rank1": rank1_identification(emb, labels)}


def _evaluate_identity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a generated set (or any folder per person): <folder>/<person>/<image>")
    p.add_argument("--recognizer", required=True, help="embedding checkpoint of the face or hand task")
    p.add_argument("--real", default=None, help="also a real folder per person, for comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true")


def _evaluate_identity(model, args) -> int:
    recognizer = load_recognizer(args.recognizer, args.device)
    results = [identity_report(recognizer, args.folder, args.batch_size)]
    if args.real:
        results.append(identity_report(recognizer, args.real, args.batch_size))
    if args.json:
        print(json.dumps(results if args.real else results[0], indent=2))
        return 0
    print(f"{'set':<40} {'people':>6} {'images':>6} {'AUC':>7} {'EER':>7} {'rank-1':>7} {'sim same':>8} {'sim diff':>8}")
    for r in results:
        print(f"{r['folder'][-40:]:<40} {r['individuals']:>6} {r['images']:>6} {r['auc']:>7.4f} {r['eer']:>7.4f} "
              f"{r['rank1']:>7.4f} {r['mean_same']:>8.4f} {r['mean_different']:>8.4f}")
    return 0


# ----- quality -----
def _quality_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="generated images (searched recursively)")
    p.add_argument("--real", required=True, help="real images (searched recursively)")
    p.add_argument("--inception", default=None, help="local Inception weights (torchvision inception_v3_google-*.pth, "
                   "or pt_inception-2015-12-05-*.pth with torch-fidelity); nothing is downloaded")
    p.add_argument("--size", type=int, default=None, help="resize + center-crop both sets to this (default: the "
                   "checkpoint's image_size)")
    p.add_argument("--json", action="store_true")


def _read_set(folder: str | Path, size: int) -> torch.Tensor:
    from datamodules.palms import resize_center_crop, scan_palms

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ZooError(f"{root} is not a folder of images.")
    scan = scan_palms(root)
    if not scan.items:
        raise ZooError(f"{root}: no readable image.")
    x = np.stack([resize_center_crop(load_rgb(p), size) for p, _ in scan.items])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _quality(model, args) -> int:
    from models.palm.metrics import fid_kid, inception_feature

    inception_feature(args.inception)  # fail before reading any image when the weights are missing
    size = args.size or int(model.cfg.image_size)
    result = fid_kid(_read_set(args.real, size), _read_set(args.folder, size), args.inception)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"FID {result['fid']:.2f}  KID {result['kid']:.4f} +- {result['kid_std']:.4f}  "
              f"({result['generated']} generated vs {result['real']} real images, {size} px)")
    return 0


COMMANDS: list[Command] = [
    Command("generate", "M synthetic individuals x N identity-keeping variations -> <out>/<individual>/<k>.png",
            _generate_args, _generate, aliases=("predict",)),
    Command("evaluate", "verification AUC / EER and rank-1 of same- vs different-individual pairs of a folder per "
            "person, in a face or hand checkpoint's embedding space", _evaluate_identity_args, _evaluate_identity,
            aliases=("evaluate-identity",)),
    Command("quality", "FID and KID (torchmetrics) of generated vs real images, with local Inception weights",
            _quality_args, _quality),
]
