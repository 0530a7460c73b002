"""Metric-learning losses for embeddings, from pytorch-metric-learning: triplet margin (with a miner), ArcFace, CosFace.

`MetricLoss` is an nn.Module, so a LightningModule that holds it as a submodule optimises the class weights of ArcFace
and CosFace with the rest of the model.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from zoo.errors import unknown

LOSSES = ("triplet", "arcface", "cosface")
MINERS = ("all", "semihard", "hard", "none")
# The usual margins when none is configured: triplet (Euclidean distance between unit vectors), ArcFace (degrees),
# CosFace (cosine).
DEFAULT_MARGIN = {"triplet": 0.2, "arcface": 28.6, "cosface": 0.35}


def make_miner(kind: str, margin: float):
    """TripletMarginMiner of `kind` (all / semihard / hard), or None for "none" (the loss uses every triplet)."""
    from pytorch_metric_learning import miners

    if kind == "none":
        return None
    if kind not in MINERS:
        raise unknown("miner", kind, MINERS)
    return miners.TripletMarginMiner(margin=margin, type_of_triplets=kind)


def _margin_softmax(cls, num_classes: int, embedding_dim: int, margin: float, scale: float):
    """pytorch-metric-learning's ArcFace / CosFace with its class weight W (embedding_dim, num_classes) allocated by
    `torch.empty`, which follows the default device: pml makes W with the legacy `torch.Tensor(...)` constructor,
    which would allocate it on the CPU even inside a shape-only build on the meta device (zoo/bounded.py)."""
    with torch.random.fork_rng(devices=[]):  # the 1 x 1 placeholder leaves the random stream as it was
        loss = cls(num_classes=1, embedding_size=1, margin=margin, scale=scale)
    loss.num_classes = num_classes
    loss.W = nn.Parameter(torch.empty(embedding_dim, num_classes))
    loss.weight_init_func(loss.W)  # pml's own initialisation, drawing the same numbers as before
    return loss


class MetricLoss(nn.Module):
    """loss(embeddings (B, D), labels (B,) int) -> scalar.

    triplet: TripletMarginLoss(margin) on the triplets the miner picks (the miner can be swapped with `set_miner`,
    e.g. "all" then "hard" in the two-stage schedule). arcface / cosface: additive angular / cosine margin softmax over
    `num_classes` training identities, with a learnt (embedding_dim, num_classes) weight `loss.W`; no miner.
    """

    def __init__(self, kind: Literal["triplet", "arcface", "cosface"], embedding_dim: int, num_classes: int = 0,
                 margin: float | None = None, scale: float = 64.0, miner: str = "semihard"):
        super().__init__()
        from pytorch_metric_learning import losses

        if kind not in LOSSES:
            raise unknown("loss", kind, LOSSES)
        self.kind = kind
        self.margin = DEFAULT_MARGIN[kind] if margin is None else float(margin)
        if kind == "triplet":
            self.loss = losses.TripletMarginLoss(margin=self.margin)
        else:
            cls = losses.ArcFaceLoss if kind == "arcface" else losses.CosFaceLoss
            self.loss = _margin_softmax(cls, max(num_classes, 1), embedding_dim, self.margin, scale)
        self.miner_kind = "none"
        self.miner = None
        self.set_miner(miner)

    def set_miner(self, kind: str) -> None:
        """Use a TripletMarginMiner of this kind (triplet loss only; the classification losses take no miner)."""
        self.miner_kind = kind if self.kind == "triplet" else "none"
        self.miner = make_miner(self.miner_kind, self.margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        embeddings = embeddings.float()  # margins and scale 64 are not safe in half precision
        if self.miner is not None:
            return self.loss(embeddings, labels, self.miner(embeddings, labels))
        return self.loss(embeddings, labels)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, margin={self.margin}, miner={self.miner_kind}"
