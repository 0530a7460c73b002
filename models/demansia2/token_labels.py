"""Token labels from any teacher classifier, in LV-ViT's format, for any ImageFolder set.

    python -m models.demansia2.token_labels DATA_DIR --teacher resnet50 --pretrained --out labels/   # timm, by name
    python -m models.demansia2.token_labels DATA_DIR --teacher checkpoints/demansia2/<run>/best.ckpt --out labels/
    python predict.py --ckpt checkpoints/demansia2/<run>/best.ckpt token-labels DATA_DIR --out labels/

For every training image `<DATA_DIR>/train/<class>/<stem>.<ext>` one file `<out>/<class>/<stem>.pt` is written: an fp16
tensor (2, 5, h, w), the teacher's top-5 class scores (logits) and their class indices at each of h x w positions.
The score map is the teacher's classifier applied at every position of its last feature map (how LV-ViT's labels
were made): a timm CNN's head on each (C,) feature vector of its (C, h, w) map; a ViT's head on each patch token;
DeMansia 2's `aux_head` on its patch tokens. The whole image is resized to the teacher's input size (aspect not
kept), so that the map covers the whole image: the training crop box is stored as fractions of the image.

`train.py --set token_label_dir=<out>` then reads them unchanged (datamodules/imagenet.py); indices are dataset class
indices (the order of the sorted class folders). A 1000-class ImageNet teacher on a set whose class folders are
ImageNet wnids (Imagenette, ImageNet subsets) is restricted to those classes; any other class-count mismatch is an
error. Runs are resumable: images whose label file exists are skipped; each file is written atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2 as T

from zoo.errors import ZooError
from zoo.images import ImageReadError, load_rgb

TOP_K = 5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Teacher:
    """A classifier that gives dense class scores.

    net: the network (eval mode). num_classes: K of its classifier. image_size: side the whole image is resized to.
    mean / std: input normalisation. class_map: teacher class index of each dataset class (None = identity).
    name: what the user gave (timm name or checkpoint path), for messages.
    """

    net: nn.Module
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    class_map: Tensor | None = None

    def transform(self):
        return T.Compose([T.ToImage(), T.Resize((self.image_size, self.image_size), antialias=True),
                          T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)])

    @torch.no_grad()
    def dense_scores(self, x: Tensor) -> Tensor:
        """Images (B, 3, S, S) -> class scores (B, K', h, w), K' = dataset classes when `class_map` is set."""
        scores = dense_logits(self.net, x)
        if self.class_map is not None:
            scores = scores.index_select(1, self.class_map.to(scores.device))
        return scores.float()

    @torch.no_grad()
    def logits(self, x: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
               ) -> Tensor:
        """The teacher's class logits (B, K') of a student batch: images (B, 3, H, W) normalised with `mean` / `std`
        (the student's pipeline), re-normalised for the teacher and resized to its input size where those differ;
        K' = dataset classes when `class_map` is set."""
        if tuple(mean) != tuple(self.mean) or tuple(std) != tuple(self.std):
            m, s = (torch.tensor(v, device=x.device, dtype=x.dtype)[:, None, None] for v in (mean, std))
            tm, ts = (torch.tensor(v, device=x.device, dtype=x.dtype)[:, None, None] for v in (self.mean, self.std))
            x = (x * s + m - tm) / ts
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        logits = self.net(x)
        if self.class_map is not None:
            logits = logits.index_select(1, self.class_map.to(logits.device))
        return logits.float()


def dense_logits(net: nn.Module, x: Tensor) -> Tensor:
    """The classifier applied at every position of the network's last feature map: (B, 3, S, S) -> (B, K, h, w).

    DeMansia 2 (`aux_head` + `token_grid`): its token head on the patch tokens. timm CNNs (NCHW or NHWC features):
    `forward_head` on each position as a 1x1 map (so a head's own norm, pooling and dropout apply as in a forward).
    timm ViTs (tokens (B, N, C)): `fc_norm` and the classifier on each patch token.
    """
    if hasattr(net, "aux_head") and hasattr(net, "token_grid"):
        gh, gw = net.token_grid(x)
        _, tokens = net.split_tokens(net.forward_features(x))
        return rearrange(net.aux_head(tokens), "b (h w) k -> b k h w", h=gh, w=gw)
    feats = net.forward_features(x)
    if feats.ndim == 4:
        if getattr(net, "output_fmt", "NCHW") == "NHWC":
            feats = rearrange(feats, "b h w c -> b c h w")
        b, _, h, w = feats.shape
        cells = rearrange(feats, "b c h w -> (b h w) c 1 1")
        if getattr(net, "output_fmt", "NCHW") == "NHWC":
            cells = rearrange(cells, "n c 1 1 -> n 1 1 c")
        logits = net.forward_head(cells)
        return rearrange(logits, "(b h w) k -> b k h w", b=b, h=h, w=w)
    if feats.ndim == 3:
        prefix = int(getattr(net, "num_prefix_tokens", 0))
        tokens = feats[:, prefix:]
        n = tokens.shape[1]
        grid = getattr(getattr(net, "patch_embed", None), "grid_size", None)
        h, w = (int(grid[0]), int(grid[1])) if grid is not None and grid[0] * grid[1] == n else (int(n ** 0.5),) * 2
        if h * w != n:
            raise ZooError(f"cannot lay the teacher's {n} tokens on a grid: give a CNN or a ViT with a square grid")
        norm = getattr(net, "fc_norm", nn.Identity())
        logits = net.get_classifier()(norm(tokens))
        return rearrange(logits, "b (h w) k -> b k h w", h=h, w=w)
    raise ZooError(f"the teacher's features have shape {tuple(feats.shape)}: token labels need a feature map "
                   f"(B, C, h, w) or tokens (B, N, C)")


def imagenet_class_map(classes: list[str], num_classes: int) -> Tensor | None:
    """Teacher indices of `classes` when they are all ImageNet-1k wnids and the teacher has 1000 classes, else None."""
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    wnids = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    if not all(c in wnids for c in classes):
        return None
    return torch.tensor([wnids[c] for c in classes])


def check_classes(teacher: Teacher, classes: list[str], use: str = "token labels need", top_k: bool = True) -> None:
    """Match the teacher's classes with the dataset's class folders (sets `class_map` for ImageNet teachers).
    `use` words what needs them in the error; `top_k`: the dataset must also have TOP_K classes (token labels)."""
    if teacher.num_classes == len(classes):
        return
    teacher.class_map = imagenet_class_map(classes, teacher.num_classes)
    if teacher.class_map is None:
        raise ZooError(f"The teacher {teacher.name} has {teacher.num_classes} classes but the dataset has "
                       f"{len(classes)} class folders ({', '.join(classes[:3])}, ...): {use} the "
                       f"teacher's classes to be the dataset's. Train the teacher on this dataset (e.g. `train.py "
                       f"--model demansia2 --set backbone=resnet18 --data-dir ...`), or use an ImageNet teacher on "
                       f"class folders named by ImageNet wnids.")
    if top_k and len(classes) < TOP_K:
        raise ZooError(f"token labels hold the top {TOP_K} classes: the dataset has only {len(classes)}")


def label_path(out: Path, image: Path) -> Path:
    """Where the label of `image` goes: `<out>/<class folder>/<image stem>.pt` (what the training pipeline reads)."""
    return out / image.parent.name / f"{image.stem}.pt"


def top_k_map(scores: Tensor, k: int = TOP_K) -> Tensor:
    """Dense scores (K, h, w) -> (2, k, h, w) float16: the top-k scores, then their class indices."""
    values, indices = scores.topk(k, dim=0)
    return torch.stack([values, indices.to(values.dtype)]).to(torch.float16)


def _save_atomic(tensor: Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(tensor.contiguous().clone(), tmp)
    os.replace(tmp, path)


def write_token_labels(teacher: Teacher, images: list[tuple[Path, int]], classes: list[str], out: Path,
                       batch_size: int = 32, device: str | torch.device = "cpu", progress: bool = True,
                       ) -> dict[str, object]:
    """Write the label file of every image in `images` [(path, class index)] that has none yet.

    Returns {"written", "skipped", "failed": [ImageReadError], "seconds", "grid": (h, w)}. Unreadable images are
    reported one line each and left without a label; the others are written (fp16, atomically).
    """
    check_classes(teacher, classes)
    if teacher.num_classes < TOP_K and teacher.class_map is None:
        raise ZooError(f"token labels hold the top {TOP_K} classes: the teacher {teacher.name} has "
                       f"{teacher.num_classes}")
    if len(classes) > 2048:
        raise ZooError(f"{len(classes)} classes: fp16 label files hold class indices exactly only up to 2048")
    todo = [(p, c) for p, c in images if not label_path(out, p).is_file()]
    skipped = len(images) - len(todo)
    transform = teacher.transform()
    teacher.net.eval().to(device)
    failed: list[ImageReadError] = []
    written, grid, start = 0, None, time.perf_counter()
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"token labels ({teacher.name})", unit="img", file=sys.stderr)
    for i in range(0, len(todo), batch_size):
        chunk, tensors = [], []
        for path, _ in todo[i:i + batch_size]:
            try:
                tensors.append(transform(Image.fromarray(load_rgb(path))))
                chunk.append(path)
            except ImageReadError as e:
                failed.append(e)
                print(f"token labels: skipped {path}: {e}", file=sys.stderr)
        if tensors:
            scores = teacher.dense_scores(torch.stack(tensors).to(device)).cpu()
            grid = tuple(scores.shape[-2:])
            for path, s in zip(chunk, scores):
                _save_atomic(top_k_map(s), label_path(out, path))
            written += len(chunk)
        if bar is not None:
            bar.update(len(todo[i:i + batch_size]))
    if bar is not None:
        bar.close()
    return {"written": written, "skipped": skipped, "failed": failed, "seconds": time.perf_counter() - start,
            "grid": grid}


# ----------------------------------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------------------------------
def _normalisation(transform) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean / std of the Normalize step of a torchvision / timm eval transform (ImageNet's when there is none)."""
    for t in getattr(transform, "transforms", []):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return IMAGENET_MEAN, IMAGENET_STD


def teacher_from_module(module, name: str, image_size: int | None = None) -> Teacher:
    """A zoo classifier (a DeMansia 2 checkpoint, with its own network or a timm backbone) as a teacher."""
    net = next((getattr(module, a) for a in ("net", "model") if isinstance(getattr(module, a, None), nn.Module)),
               None)
    cfg = getattr(module, "cfg", None)
    num_classes = int(getattr(cfg, "num_classes", 0) or 0)
    if net is None or not num_classes:
        raise ZooError(f"{name} holds a '{getattr(module, 'TASK', '?')}' model, which is not a classifier: token "
                       f"labels need a classifier (a DeMansia 2 checkpoint, or a timm model by name)")
    size = image_size or int(getattr(cfg, "image_size", 0) or 224)
    mean, std = _normalisation(module.eval_transform()) if hasattr(module, "eval_transform") else \
        (IMAGENET_MEAN, IMAGENET_STD)
    return Teacher(net=net.eval(), num_classes=num_classes, image_size=size, mean=mean, std=std, name=name)


def teacher_from_timm(name: str, pretrained: bool = False, image_size: int | None = None,
                      num_classes: int | None = None) -> Teacher:
    """A timm classifier by name (`pretrained=True`: its published weights, downloaded when online)."""
    from timm.data import resolve_data_config

    import models  # noqa: F401  (registers the zoo's own timm names)
    from models.backbones import create_backbone

    net = create_backbone(name, pretrained=pretrained, num_classes=num_classes)  # None: the model's own classes
    data = resolve_data_config({}, model=net)
    size = image_size or int(data["input_size"][-1])
    return Teacher(net=net.eval(), num_classes=int(net.num_classes), image_size=size, mean=tuple(data["mean"]),
                   std=tuple(data["std"]), name=name)


def load_teacher(spec: str, pretrained: bool = False, image_size: int | None = None, trust: bool = False) -> Teacher:
    """`spec`: a checkpoint / safetensors file written by the zoo, or a timm model name."""
    path = Path(spec).expanduser()
    if path.is_file():
        import model_config  # noqa: F401  (registers the tasks that load_model looks up)
        from zoo.checkpoint import load_model

        return teacher_from_module(load_model(path, trust=trust).eval(), spec, image_size)
    if any(sep in spec for sep in ("/", os.sep)) or spec.endswith((".ckpt", ".safetensors", ".pt", ".pth")):
        raise ZooError(f"teacher checkpoint {spec} not found. Give a checkpoint written by train.py, or a timm model "
                       f"name (e.g. resnet50 with --pretrained).")
    return teacher_from_timm(spec, pretrained=pretrained, image_size=image_size)


def training_images(data_dir: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """The train split of an ImageFolder set: [(path, class index)], class folder names."""
    from datamodules.imagenet import scan_split

    index = scan_split(Path(data_dir).expanduser(), "train")
    return index.samples, index.classes


def make_token_labels(teacher: Teacher, data_dir: str | Path, out: str | Path, batch_size: int = 32,
                      device: str = "cpu", progress: bool = True) -> dict[str, object]:
    """Token labels for every training image of `data_dir` into `out`; prints one summary line."""
    images, classes = training_images(Path(data_dir))
    result = write_token_labels(teacher, images, classes, Path(out).expanduser(), batch_size, device, progress)
    grid = "x".join(map(str, result["grid"])) if result["grid"] else "-"
    print(f"token labels: {result['written']} written, {result['skipped']} already there, {len(result['failed'])} "
          f"unreadable, in {result['seconds']:.1f} s ({grid} map per image) -> {out}", file=sys.stderr)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by the verb and the command line."""
    parser.add_argument("data_dir", help="ImageFolder set: <data_dir>/train/<class>/<images>")
    parser.add_argument("--out", required=True, help="folder for <class>/<stem>.pt label files (resumable)")
    parser.add_argument("--image-size", type=int, default=None, help="side the whole image is resized to "
                        "(default: the teacher's input size)")
    parser.add_argument("--batch-size", type=int, default=32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.demansia2.token_labels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--teacher", required=True, help="timm model name, or a zoo checkpoint of a classifier")
    parser.add_argument("--pretrained", action="store_true", help="timm teacher: its published weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust-checkpoint", action="store_true")
    args = parser.parse_args(argv)
    try:
        teacher = load_teacher(args.teacher, args.pretrained, args.image_size, args.trust_checkpoint)
        result = make_token_labels(teacher, args.data_dir, args.out, args.batch_size, args.device)
    except ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.exit(main())
