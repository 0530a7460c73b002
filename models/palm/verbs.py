"""`predict.py` verbs of the palm task: generate, evaluate (identity consistency), quality (FID / KID)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules.generated_set import RECORD, read_record, warn_if_incomplete, write_record
from zoo.commands import Command
from zoo.errors import ZooError
from zoo.images import load_rgb

EMBEDDING_TASKS = ("face", "hand")


def person_name(i: int) -> str:
    """Folder name of generated individual `i` (sorts in order)."""
    return f"id_{i:05d}"


# ----- generate -----
# Upper bounds of a generation (documented in docs/palm.md): 10**5 individuals x 10**3 images is 10**8 files, beyond
# any folder a recogniser is trained from; larger counts are almost always a typo (or an extra zero).
MAX_INDIVIDUALS = 100_000
MAX_PER_INDIVIDUAL = 1_000
PARTIAL = ".partial-"  # an individual being written: <out>/.partial-id_00003/, renamed to id_00003/ when complete
# The settings a resumed generation must share with the run it completes ("weights": a fingerprint of the sampled
# weights, so a set is never finished by another checkpoint).
REQUEST_KEYS = ("individuals", "per_individual", "seed", "steps", "variation", "method", "raw_weights", "image_size",
                "weights")


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `generate`, after the set's record says what was written: `completed` of `individuals`."""

    def __init__(self, out: Path, completed: int, individuals: int, per_individual: int):
        super().__init__()
        self.out, self.completed, self.individuals, self.per_individual = out, completed, individuals, per_individual


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--individuals", type=int, required=True, help=f"M synthetic individuals (1 .. {MAX_INDIVIDUALS})")
    p.add_argument("--per-individual", type=int, required=True, help=f"N images of each (1 .. {MAX_PER_INDIVIDUAL})")
    p.add_argument("--out", required=True, help="folder to write <out>/<individual>/<k>.png into; the same command "
                   "again finishes an interrupted set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the checkpoint's sampling_steps)")
    p.add_argument("--variation", type=float, default=0.35, help="how far an individual's images may move, 0..1 "
                   "(0 = identical images; default 0.35)")
    p.add_argument("--method", choices=["renoise", "shared-noise"], default="renoise",
                   help="renoise: re-noise a base palm part of the way and denoise again (default); shared-noise: "
                        "Diff-Palm's shared initial and late-step noise")
    p.add_argument("--batch-size", type=int, default=16, help="images per denoiser call")
    p.add_argument("--raw-weights", action="store_true", help="sample from the raw (non-EMA) weights")
    p.add_argument("--overwrite", action="store_true", help="replace the set in --out: deletes what its previous "
                   "generation wrote (the folders its .generation.json records), nothing else")


def _check_generate_args(args) -> Path:
    for flag, value, top in (("--individuals", args.individuals, MAX_INDIVIDUALS),
                             ("--per-individual", args.per_individual, MAX_PER_INDIVIDUAL)):
        if not 1 <= value <= top:
            raise ZooError(f"{flag} {value}: must be between 1 and {top} (--individuals <= {MAX_INDIVIDUALS}, "
                           f"--per-individual <= {MAX_PER_INDIVIDUAL}).")
    if not 0.0 <= args.variation <= 1.0:
        raise ZooError(f"--variation {args.variation}: must be between 0 (identical images) and 1.")
    if args.steps is not None and args.steps < 1:
        raise ZooError(f"--steps {args.steps}: must be >= 1.")
    if args.batch_size < 1:
        raise ZooError(f"--batch-size {args.batch_size}: must be >= 1.")
    return Path(args.out).expanduser()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (names, shapes, dtypes and values)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _index_of(name: str, prefix: str = "") -> int | None:
    """i for a folder named <prefix>id_XXXXX (as `person_name(i)` writes it), else None."""
    rest = name[len(prefix):] if name.startswith(prefix) else None
    if rest is None or not rest.startswith("id_") or not rest[3:].isdigit() or person_name(int(rest[3:])) != rest:
        return None
    return int(rest[3:])


def _generated_folders(out: Path, record: dict) -> list[Path]:
    """The folders (finished or partial) of individuals a generation's record names, that exist in `out`."""
    total = int(record.get("individuals", 0))
    found = []
    for p in out.iterdir():
        i = _index_of(p.name, PARTIAL if p.name.startswith(PARTIAL) else "")
        if i is not None and i < total and p.is_dir():
            found.append(p)
    return sorted(found)


def _count_finished(out: Path, record: dict) -> int:
    """Individuals whose folder is in place (read from the disk: an interrupt may fall between a rename and the
    count)."""
    return sum(1 for p in _generated_folders(out, record) if not p.name.startswith(PARTIAL))


def _remove_images(folders: list[Path], per_individual: int, why: str) -> None:
    """Delete the images 0.png .. (per_individual - 1).png of each folder and the folder itself; a ZooError naming
    the first other file, before anything is deleted, when a folder holds one."""
    names = {f"{k}.png" for k in range(per_individual)}
    for folder in folders:
        other = next((p for p in sorted(folder.iterdir()) if p.name not in names or not p.is_file()), None)
        if other is not None:
            raise ZooError(f"{why}: {other} was not written by that generation, so nothing was deleted. Move it out "
                           f"of {folder.parent}, or give another --out.")
    try:
        for folder in folders:
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
    except OSError as e:
        raise ZooError(f"{why}: cannot delete {e.filename} ({e.strerror or e}); give a folder you can write to.") \
            from None


def _prepare_out(out: Path, request: dict, overwrite: bool) -> set[int]:
    """Make `out` ready for the requested set (before anything is sampled) and return the individuals already written
    there by an interrupted run of the same request (resumed); a ZooError when `out` holds something else."""
    if out.exists() and not out.is_dir():
        raise ZooError(f"--out {out} is a file; give a folder.")
    record = read_record(out) if out.is_dir() else None
    if out.is_dir() and (out / RECORD).exists() and record is None:
        raise ZooError(f"--out {out}: {out / RECORD} cannot be read, so what it generated is unknown. Delete the "
                       f"folder (or that file) yourself, or give another --out.")
    if record is not None and overwrite:
        _remove_images(_generated_folders(out, record), int(record.get("per_individual", 0)),
                       f"--overwrite {out}")
        with contextlib.suppress(FileNotFoundError):
            (out / RECORD).unlink()
        record = None
    if record is not None:
        differ = [f"{k} {record[k]} -> {request[k]}" for k in REQUEST_KEYS if k in record and record[k] != request[k]]
        if differ:
            raise ZooError(f"--out {out} holds a set generated with other settings ({', '.join(differ)}); finishing "
                           f"it needs the same ones (its first command: {record.get('command') or 'see ' + RECORD}). "
                           f"Add --overwrite to replace it, or give another --out.")
        if record.get("status", "complete") == "complete":
            return set(range(request["individuals"]))
        partial = [p for p in _generated_folders(out, record) if p.name.startswith(PARTIAL)]
        _remove_images(partial, request["per_individual"], f"resuming {out}")
        return {i for p in _generated_folders(out, record) if (i := _index_of(p.name)) is not None}
    if out.is_dir():
        taken = next((p for p in sorted(out.iterdir()) if _index_of(p.name) is not None
                      or _index_of(p.name, PARTIAL) is not None), None)
        if taken is not None:
            raise ZooError(f"--out {out} holds {taken.name}/ but no {RECORD}, so it was not written by a generation "
                           f"this zoo can resume or replace. Move it away, or give another --out.")
        if any(out.iterdir()) and not overwrite:
            raise ZooError(f"--out {out} already holds files; a generated set must not mix with other images. Give "
                           f"an empty or new folder, or add --overwrite.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZooError(f"--out {out} cannot be created ({e.strerror or e}); give a folder you can write to.") from None
    return set()


def generate(model, out: str | Path, individuals: int, per_individual: int, seed: int = 0, steps: int | None = None,
             variation: float = 0.35, method: str = "renoise", batch_size: int = 16, raw: bool = False,
             progress: bool = True, overwrite: bool = False, command: str | None = None) -> list[Path]:
    """Write `individuals` x `per_individual` PNGs to out/<id_XXXXX>/<k>.png (the people layout the zoo's recognisers
    read) and out/.generation.json (datamodules/generated_set.py: what was asked, then what was completed); returns
    the paths written by this call.

    Each individual's folder is written under a hidden name and renamed when complete. A set interrupted before
    (same settings and weights) is resumed: only its missing individuals are drawn, exactly as an uninterrupted run
    would draw them. `overwrite` first deletes what the previous generation recorded (nothing else). Ctrl-C leaves
    the record saying what was written and raises `GenerationInterrupted`.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    sampler = model.identity_sampler(steps, variation, method, seed, batch_size, raw)
    request = {"individuals": individuals, "per_individual": per_individual, "seed": seed, "steps": sampler.steps,
               "variation": variation, "method": method, "raw_weights": raw, "image_size": model.cfg.image_size,
               "weights": weights_fingerprint(sampler.diffusion)}
    done = _prepare_out(out, request, overwrite)
    record = {**request, "status": "running", "completed": len(done), "layout": "id_XXXXX/<k>.png (5-digit index)",
              "command": command}
    if len(done) == individuals:
        return []
    try:  # the first write into --out: a folder that cannot be written fails here, before any sampling
        write_record(out, record)
    except OSError as e:
        raise ZooError(f"--out {out} cannot be written ({e.strerror or e}); give a folder you can write to.") from None
    bar = tqdm(total=sampler.model_calls(individuals - len(done), per_individual), desc="generating palms",
               unit="step", disable=not progress)
    written: list[Path] = []
    partial = None
    try:
        with torch.no_grad():
            for i, images in sampler.generate(individuals, per_individual, progress=bar.update, skip=done):
                partial = out / (PARTIAL + person_name(i))
                partial.mkdir()
                arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
                for k, a in enumerate(arrays):
                    Image.fromarray(a).save(partial / f"{k}.png")
                os.rename(partial, out / person_name(i))
                partial = None
                written += [out / person_name(i) / f"{k}.png" for k in range(len(arrays))]
                record["completed"] += 1
                write_record(out, record)
        record["status"] = "complete"
    except KeyboardInterrupt:
        record.update(status="interrupted", completed=_count_finished(out, record))
        raise GenerationInterrupted(out, record["completed"], individuals, per_individual) from None
    except OSError as e:
        record.update(status="failed", completed=_count_finished(out, record))
        raise ZooError(f"--out {out}: writing stopped ({type(e).__name__}: {e}); {record['completed']} of "
                       f"{individuals} individuals are complete. Free space or fix the folder, then run the same "
                       f"command again to finish the set.") from None
    finally:
        bar.close()
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):
            write_record(out, record)
    return written


def _command_line(args) -> str:
    """The predict.py command that (re)runs this generation, for the set's record and its notices."""
    parts = ["python predict.py", "--ckpt", args.ckpt, "generate", "--individuals", args.individuals,
             "--per-individual", args.per_individual, "--out", args.out, "--seed", args.seed, "--variation",
             args.variation, "--method", args.method]
    if args.steps is not None:
        parts += ["--steps", args.steps]
    if args.raw_weights:
        parts.append("--raw-weights")
    return " ".join(shlex.quote(str(p)) if not str(p).startswith("python ") else str(p) for p in parts)


def _generate(model, args) -> int:
    out = _check_generate_args(args)
    if not args.raw_weights:
        _ = model.ema_diffusion  # the clear error when the checkpoint has no EMA weights
    try:
        written = generate(model.to(args.device), out, args.individuals, args.per_individual, args.seed, args.steps,
                           args.variation, args.method, args.batch_size, args.raw_weights, overwrite=args.overwrite,
                           command=_command_line(args))
    except GenerationInterrupted as e:
        print(f"interrupted: {e.out} holds {e.completed} of {e.individuals} individuals, each complete "
              f"({e.completed * e.per_individual} images; recorded in {RECORD}). Run the same command again to "
              f"write the other {e.individuals - e.completed}.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first write into --out
        print(f"interrupted before anything was generated into {out}.", file=sys.stderr)
        return 130
    if not written:
        print(f"{out} already holds the complete set ({args.individuals} x {args.per_individual}); nothing written. "
              f"Add --overwrite to generate it again.")
        return 0
    print(f"wrote {len(written)} images of {len(written) // args.per_individual} individuals to "
          f"{out}/<individual>/<k>.png ({model.cfg.image_size} px, {args.method}, variation {args.variation}, seed "
          f"{args.seed}; the set holds {args.individuals} x {args.per_individual}). Train a recogniser on it: "
          f"python train.py --model face --data-dir {out}")
    return 0


# ----- evaluate: identity consistency of a generated set -----
def load_recognizer(path: str | Path, device: str = "cpu"):
    """A zoo embedding checkpoint (a task whose model has `embed`), or a ZooError naming the task it holds."""
    from zoo.checkpoint import checkpoint_task, load_model, read_checkpoint

    path = Path(path).expanduser()
    if not path.is_file():
        raise ZooError(f"--recognizer {path}: no such file. Give an embedding checkpoint of the "
                       f"{' or '.join(EMBEDDING_TASKS)} task written by train.py (checkpoints/face/<run>/last.ckpt or "
                       f"best-*.ckpt), or its .safetensors export.")
    task = checkpoint_task(read_checkpoint(path, for_predict=True), path)
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


def identity_report(recognizer, folder: str | Path, batch_size: int = 64, with_pairs: bool = False):
    """Identity metrics of a folder per person (models.palm.metrics.identity_metrics + rank-1); with `with_pairs`
    also the (scores, same) of every pair, for the ROC / DET plots."""
    from datamodules.palms import scan_palms
    from models.palm.metrics import identity_metrics, rank1_identification
    from zoo.verification import all_pair_scores

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ZooError(f"{root} is not a folder. Expected one sub-folder per individual: <folder>/<person>/<image>.")
    warn_if_incomplete(root)
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
    report = {"folder": str(root), "images": len(paths), "individuals": len(names), **identity_metrics(emb, labels),
              "rank1": rank1_identification(emb, labels)}
    return (report, all_pair_scores(emb, labels)) if with_pairs else report


def _evaluate_identity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a generated set (or any folder per person): <folder>/<person>/<image>")
    p.add_argument("--recognizer", required=True, help="embedding checkpoint of the face or hand task")
    p.add_argument("--real", default=None, help="also a real folder per person, for comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, metavar="RESULT_JSON", help="also write the result as JSON to this file, "
                   "with the ROC and DET curves of each set beside it (<stem>_roc.png, <stem>_det.png)")


def _evaluate_identity(model, args) -> int:
    from zoo.verification import write_result

    recognizer = load_recognizer(args.recognizer, args.device)
    sets = [("generated", args.folder)] + ([("real", args.real)] if args.real else [])
    results, curves = [], {}
    for label, folder in sets:
        report, curves[label] = identity_report(recognizer, folder, args.batch_size, with_pairs=True)
        results.append(report)
    plots = write_result(args.out, {"sets": results}, curves, "palm identity") if args.out else []
    if args.json:
        print(json.dumps(results if args.real else results[0], indent=2))
        return 0
    print(f"{'set':<40} {'people':>6} {'images':>6} {'AUC':>7} {'EER':>7} {'rank-1':>7} {'sim same':>8} {'sim diff':>8}")
    for r in results:
        print(f"{r['folder'][-40:]:<40} {r['individuals']:>6} {r['images']:>6} {r['auc']:>7.4f} {r['eer']:>7.4f} "
              f"{r['rank1']:>7.4f} {r['mean_same']:>8.4f} {r['mean_different']:>8.4f}")
    if plots:
        print(f"wrote {args.out} and {', '.join(map(str, plots))}")
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
