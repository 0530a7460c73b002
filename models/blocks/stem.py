"""Convolutional stems that turn an image into a token grid (shared by DeMansia 2 and the face encoder)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ConvStem(nn.Module):
    """LV-ViT's 4-conv patch embedding: (B, in_chans, H, W) -> (B, d_model, H / (2 p), W / (2 p)).

    conv 7x7 / stride 2 -> BN -> ReLU, two conv 3x3 -> BN -> ReLU, projection conv with kernel = stride = p
    (`patch_size`). Keys conv1-3, bn1-3, proj as in the released checkpoint.
    """

    def __init__(self, in_chans: int = 3, d_model: int = 192, patch_size: int = 8, channels: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.proj = nn.Conv2d(channels, d_model, patch_size, stride=patch_size)
        self.stride = 2 * patch_size

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.proj(x)


class EarlyConvStem(nn.Module):
    """Stacked 3x3 stride-2 convolutions (Xiao et al. 2021, "Early convolutions help transformers see better"):
    (B, in_chans, H, W) -> (B, d_model, H / 2p, W / 2p) with 2p = `stride` (a power of two).

    log2(stride) stages of conv 3x3 / stride 2 -> BN -> ReLU, widths channels, 2 channels, 4 channels, ..., then a
    1x1 projection to d_model. Downsamples gradually where `ConvStem` jumps by p in its projection. Keys
    stages.i.{0,1}.* (conv, BN), proj.*.
    """

    def __init__(self, in_chans: int = 3, d_model: int = 192, stride: int = 16, channels: int = 16):
        super().__init__()
        n = stride.bit_length() - 1
        if stride < 2 or 2**n != stride:
            raise ValueError(f"EarlyConvStem needs a power-of-two stride >= 2, got {stride}")
        widths = [in_chans] + [channels * 2**i for i in range(n)]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(widths, widths[1:]))
        self.proj = nn.Conv2d(widths[-1], d_model, 1)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.proj(x)
