"""Token labeling (LV-ViT): dense teacher targets for every patch token and the class token, and the loss.

The label map of an image is (2, 5, h, w): the teacher's top-5 scores and their class indices at each of h x w
locations. For a training crop the targets are built on the device, per batch:

1. scatter the top-5 scores into a dense (B, K, h, w) map (K classes, zeros elsewhere);
2. `roi_align` it over the crop box to the token grid (gh, gw) and to 1 x 1 (the class-token target);
3. mirror the token targets left-right where the image was flipped;
4. softmax over classes, then label smoothing y * (1 - s) + s / K.

Box order: boxes are (x1, y1, x2, y2) in label-map cells, the order `torchvision.ops.roi_align` reads. (LV-ViT stores
its crop as (top, left, bottom, right) but hands it to roi_align as (x1, y1, x2, y2), swapping the axes; we do not.)
`aligned=True`: cell i covers [i, i + 1), so a box on cell edges pools exactly those cells.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchvision.ops import roi_align


def dense_label_map(label_maps: Tensor, num_classes: int) -> Tensor:
    """(B, 2, k, h, w) top-k scores and class indices -> (B, num_classes, h, w) float32 score maps."""
    scores, indices = label_maps[:, 0].float(), label_maps[:, 1].round().long()
    if indices.numel() and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(f"token label class indices must be in [0, {num_classes}), got "
                         f"[{int(indices.min())}, {int(indices.max())}]: labels made for another class set?")
    dense = scores.new_zeros(scores.shape[0], num_classes, *scores.shape[-2:])
    return dense.scatter_(1, indices, scores)


def token_label_targets(label_maps: Tensor, boxes: Tensor, flips: Tensor, num_classes: int, grid: tuple[int, int],
                        smoothing: float = 0.1, style: str = "normalized") -> tuple[Tensor, Tensor]:
    """Soft targets for one batch.

    Args:
        label_maps: (B, 2, 5, h, w) top-5 scores and class indices (any float dtype).
        boxes: (B, 4) crop boxes (x1, y1, x2, y2) in label-map cells.
        flips: (B,) bool, the crop was mirrored left-right.
        num_classes: K.
        grid: the model's token grid (gh, gw).
        smoothing: label smoothing s.
        style: "normalized" (rows sum to 1) or "lvvit" (as published, rows sum to 1 + s / K); see `smooth`.
    Returns:
        class-token targets (B, K) and token targets (B, gh * gw, K).
    """
    dense = dense_label_map(label_maps, num_classes)
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=dense.dtype)[:, None],
                      boxes.to(dense.dtype)], dim=1)
    tokens = roi_align(dense, rois, output_size=tuple(grid), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    cls = roi_align(dense, rois, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flips = flips.to(device=tokens.device, dtype=torch.bool)
    tokens = torch.where(flips[:, None, None, None], tokens.flip(-1), tokens)
    tokens = rearrange(tokens, "b k h w -> b (h w) k")
    cls = rearrange(cls, "b k 1 1 -> b k")
    return smooth(cls.softmax(-1), smoothing, style), smooth(tokens.softmax(-1), smoothing, style)


def smooth(target: Tensor, smoothing: float, style: str = "normalized") -> Tensor:
    """Label smoothing of a distribution over the last axis.

    "normalized": y * (1 - s) + s / K (rows still sum to 1). "lvvit": y * (1 - s + s / K) + s / K, the on/off values
    LV-ViT (and DeMansia 2) apply to soft token labels (0.9001 and 1e-4 at s = 0.1, K = 1000; rows sum to 1 + s / K).
    """
    k = target.shape[-1]
    if style == "lvvit":
        return target * (1.0 - smoothing + smoothing / k) + smoothing / k
    if style != "normalized":
        raise ValueError(f"smoothing style must be 'normalized' or 'lvvit', got {style!r}")
    return target * (1.0 - smoothing) + smoothing / k


def one_hot_smoothed(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """(B,) class indices -> (B, K) smoothed one-hot targets."""
    return smooth(F.one_hot(labels, num_classes).float(), smoothing)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over all leading axes of -sum_k target_k log softmax(logits)_k; logits and target (..., K)."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class TokenLabelingLoss(nn.Module):
    """cls_weight * soft CE(class logits, class target) + token_weight * dense CE(token logits, token targets).

    forward(cls_logits (B, K), token_logits (B, N, K), cls_target (B, K), token_target (B, N, K) or None) ->
    (loss, {"cls": ..., "token": ...}). With token_target None (plain labels) the token term is the soft CE of the
    max over tokens of the token logits against `max_target` (B, K): it trains the quantity the eval logits use.
    `cls_loss`, when given, is the class term already computed (DeiT's distillation loss, which contains the soft CE
    of the class logits) and replaces soft CE(cls_logits, cls_target).
    """

    def __init__(self, cls_weight: float = 1.0, token_weight: float = 1.0):
        super().__init__()
        self.cls_weight, self.token_weight = cls_weight, token_weight

    def forward(self, cls_logits: Tensor, token_logits: Tensor, cls_target: Tensor, token_target: Tensor | None = None,
                max_target: Tensor | None = None, cls_loss: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if cls_loss is None:
            cls_loss = soft_cross_entropy(cls_logits, cls_target)
        if token_target is not None:
            token_loss = soft_cross_entropy(token_logits, token_target)
        elif max_target is not None:
            token_loss = soft_cross_entropy(token_logits.amax(dim=1), max_target)
        else:
            token_loss = cls_loss.new_zeros(())
        loss = self.cls_weight * cls_loss + self.token_weight * token_loss
        return loss, {"cls": cls_loss.detach(), "token": token_loss.detach()}
