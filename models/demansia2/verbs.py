"""The `classify` verb of `predict.py` for image classifiers: image files or folders -> top-k classes with
probabilities, as text or JSON.

Works with any zoo module that has `eval_transform()` (PIL image -> tensor), `class_names` and `forward` giving logits.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from zoo.commands import Command
from zoo.errors import ZooError
from zoo.images import is_image, load_rgb


def collect_images(paths: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted); a missing path is a ZooError."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image(f.name))
            if not found:
                raise ZooError(f"No images (.jpg, .jpeg, .png, ...) under folder {p}.")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ZooError(f"{p} does not exist. Give image files or folders of images.")
    return out


@torch.no_grad()
def classify(model, paths: list[Path], top_k: int = 5, batch_size: int = 32) -> list[dict]:
    """[{"image": path, "top": [{"class": name, "index": i, "prob": p}, ...]}] in the order of `paths`."""
    transform = model.eval_transform()
    device = next(model.parameters()).device
    names = model.class_names
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        x = torch.stack([transform(Image.fromarray(load_rgb(p))) for p in chunk]).to(device)
        probs = model(x).float().softmax(-1)
        k = min(top_k, probs.shape[-1])
        values, indices = probs.topk(k, dim=-1)
        for path, vals, idxs in zip(chunk, values.tolist(), indices.tolist()):
            top = [{"class": names[i] if i < len(names) else str(i), "index": i, "prob": round(v, 6)}
                   for v, i in zip(vals, idxs)]
            results.append({"image": str(path), "top": top})
    return results


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of text")


def _run(model, args: argparse.Namespace) -> int:
    results = classify(model.eval(), collect_images(args.images), args.top_k, args.batch_size)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(r["image"])
        for rank, t in enumerate(r["top"], 1):
            print(f"  {rank}. {t['class']:<32} {100 * t['prob']:6.2f}%")
    return 0


def classify_command() -> Command:
    return Command(name="classify", help="top-k classes with probabilities for image files or folders",
                   add_arguments=_add_arguments, run=_run)
