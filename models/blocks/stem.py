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
