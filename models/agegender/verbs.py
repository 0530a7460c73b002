"""`predict.py` verbs of the age/gender task: `predict` (images -> age and gender) and `export` (ONNX + int8)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from zoo.commands import Command
from zoo.errors import ZooError
from zoo.export import ExportSpec, export_command
from zoo.images import is_image, load_rgb

GENDERS = ("male", "female")


def image_paths(items: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a missing path is a ZooError."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.is_file() and is_image(q.name))
        elif p.is_file():
            paths.append(p)
        else:
            raise ZooError(f"No such image or folder: {p}.")
    if not paths:
        raise ZooError(f"No images found in {', '.join(items)}.")
    return paths


def preprocess(model, paths: list[Path]) -> torch.Tensor:
    """Images -> (N, 3, H, W) batch as the model saw in validation (resize + the backbone's normalisation)."""
    from datamodules.utkface import build_transform, data_config_for

    transform = build_transform(data_config_for(model.cfg), train=False)
    return torch.stack([transform(image=load_rgb(p))["image"] for p in paths])


def estimate(model, paths: list[Path], batch_size: int = 32) -> list[dict]:
    """One dict per image: path, age (years), gender ("male" / "female"), probability of that gender, p_female."""
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        out = model.predict_batch(preprocess(model, chunk))
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
    results = estimate(model, image_paths(args.images), args.batch_size)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['path']}\tage {r['age']:.1f}\t{r['gender']} ({r['probability']:.1%})")
    return 0


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


predict = Command("predict", "age (years) and gender with its probability for each image", _predict_arguments,
                  _predict, aliases=("classify",))
export = export_command(export_spec, help_extra=" (outputs: age in years, p_female)")
