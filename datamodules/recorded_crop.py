"""A random resized crop + horizontal flip that reports what it did, so dense targets can follow the image."""
from __future__ import annotations

import random

from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF


class RecordedCropFlip:
    """PIL image -> (crop resized to size x size, box, flipped).

    box = (x1, y1, x2, y2): the crop's edges as fractions of the input image's width and height (x right, y down).
    `flipped` is True when the crop was mirrored left-right after resizing. Crop parameters come from
    torchvision's `RandomResizedCrop.get_params` (the same distribution as timm's training crop).
    `interpolation`: "bicubic", "bilinear" or "random" (either, drawn per image, as timm's "random").
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, interpolation: str = "bicubic"):
        if interpolation not in ("bicubic", "bilinear", "random"):
            raise ValueError(f"interpolation must be bicubic, bilinear or random, got {interpolation!r}")
        self.size, self.scale, self.ratio, self.hflip, self.interpolation = size, scale, ratio, hflip, interpolation

    def __call__(self, img: Image.Image) -> tuple[Image.Image, tuple[float, float, float, float], bool]:
        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        mode = random.choice(("bilinear", "bicubic")) if self.interpolation == "random" else self.interpolation
        out = TF.resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode(mode))
        flipped = random.random() < self.hflip
        if flipped:
            out = TF.hflip(out)
        W, H = img.size
        return out, (left / W, top / H, (left + w) / W, (top + h) / H), flipped

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"
