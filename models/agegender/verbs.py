"""`predict.py` verbs of the age/gender task: `predict` (images -> age and gender) and `export` (ONNX + int8)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from zoo.commands import Command
from zoo.export import ExportSpec, export_command
from zoo.images import ImageReadError, collect_images, load_rgb, loaded_batches, report_failed

GENDERS = ("male", "female")


def image_paths(items: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a missing path is a ZooError (zoo.images)."""
    return collect_images(items)


def preprocess(model, paths: list[Path], arrays: list | None = None) -> torch.Tensor:
    """Images (or their already read RGB `arrays`) -> (N, 3, H, W) batch as the model saw in validation (resize +
    the backbone's normalisation)."""
    from datamodules.utkface import build_transform, data_config_for

    transform = build_transform(data_config_for(model.cfg), train=False)
    arrays = arrays if arrays is not None else [load_rgb(p) for p in paths]
    return torch.stack([transform(image=a)["image"] for a in arrays])


def estimate(model, paths: list[Path], batch_size: int = 32, failed: list[ImageReadError] | None = None) -> list[dict]:
    """One dict per readable image: path, age (years), gender ("male" / "female"), probability of that gender,
    p_female. Errors of unreadable images are appended to `failed` (or raised when it is None)."""
    results = []
    for chunk, arrays in loaded_batches(paths, batch_size, failed):
        out = model.predict_batch(preprocess(model, chunk, arrays))
        for path, age, p in zip(chunk, out["age"].tolist(), out["p_female"].tolist()):
            female = p >= 0.5
            results.append({"path": str(path), "age": round(age, 1), "gender": GENDERS[int(female)],
                            "probability": round(p if female else 1 - p, 4), "p_female": round(p, 4)})
    return results


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")


def _predict(model, args: argparse.Namespace) -> int:
    paths, failed = image_paths(args.images), []
    results = estimate(model, paths, args.batch_size, failed)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['path']}\tage {r['age']:.1f}\t{r['gender']} ({r['probability']:.1%})")
    return report_failed(failed, len(paths))


class AgeGenderExport(nn.Module):
    """What the exported model computes: image (B, 3, H, W) normalised -> (age (B,) years, p_female (B,))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        age, logit = self.model(image)
        return age, torch.sigmoid(logit)


def export_spec(model, args: argparse.Namespace) -> ExportSpec:
    """Traced at batch 2; checked on `--images` or on `--batch` random inputs, so the dynamic batch is exercised."""
    from datamodules.utkface import data_config_for

    data = data_config_for(model.cfg)
    shape = data["input_size"]
    generator = torch.Generator().manual_seed(0)
    images = getattr(args, "images", None)
    check = preprocess(model, image_paths(images)) if images else torch.randn(args.batch, *shape, generator=generator)
    return ExportSpec(AgeGenderExport(model).eval(), (torch.randn(2, *shape, generator=generator),),
                      ["image"], ["age", "p_female"], check=(check,),
                      metadata={"task": "agegender", "backbone": model.cfg.backbone,
                                "input": f"image (B, {', '.join(map(str, shape))}) RGB, resized, (x / 255 - mean) / std",
                                "mean": ",".join(f"{v:.4f}" for v in data["mean"]),
                                "std": ",".join(f"{v:.4f}" for v in data["std"]),
                                "outputs": "age (B,) years; p_female (B,) probability of female"})


COMMANDS: list[Command] = [
    Command("predict", "age (years) and gender with its probability for each image", _predict_arguments, _predict,
            aliases=("classify",)),
    export_command(export_spec, help_extra=" (outputs: age in years, p_female)"),
]
