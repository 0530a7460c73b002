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
from zoo.images import ImageReadError, collect_images, loaded_batches, report_failed


@torch.no_grad()
def classify(model, paths: list[Path], top_k: int = 5, batch_size: int = 32,
             failed: list[ImageReadError] | None = None) -> list[dict]:
    """[{"image": path, "top": [{"class": name, "index": i, "prob": p}, ...]}] for the readable `paths`, in order;
    the errors of unreadable ones are appended to `failed` (or raised when it is None)."""
    transform = model.eval_transform()
    device = next(model.parameters()).device
    names = model.class_names
    results = []
    for chunk, arrays in loaded_batches(paths, batch_size, failed):
        x = torch.stack([transform(Image.fromarray(a)) for a in arrays]).to(device)
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
    paths, failed = collect_images(args.images), []
    results = classify(model.eval(), paths, args.top_k, args.batch_size, failed)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"])
            for rank, t in enumerate(r["top"], 1):
                print(f"  {rank}. {t['class']:<32} {100 * t['prob']:6.2f}%")
    return report_failed(failed, len(paths))


def _add_token_label_arguments(parser: argparse.ArgumentParser) -> None:
    from models.demansia2.token_labels import add_arguments

    add_arguments(parser)


def _run_token_labels(model, args: argparse.Namespace) -> int:
    from models.demansia2.token_labels import make_token_labels, teacher_from_module

    teacher = teacher_from_module(model, args.ckpt, args.image_size)
    result = make_token_labels(teacher, args.data_dir, args.out, args.batch_size, args.device)
    return 1 if result["failed"] else 0


COMMANDS: list[Command] = [
    Command("classify", "top-k classes with probabilities for image files or folders", _add_arguments, _run,
            aliases=("predict",)),
    Command("token-labels", "LV-ViT token labels for an ImageFolder set, this model as the teacher "
            "(<out>/<class>/<stem>.pt, for --set token_label_dir)", _add_token_label_arguments, _run_token_labels),
]
