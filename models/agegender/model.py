"""The age/gender network pieces: any timm backbone (`models.backbones.create_backbone`) plus these heads."""
from __future__ import annotations

from torch import nn


def mlp_head(in_features: int, hidden: int, dropout: float) -> nn.Sequential:
    """pooled features (B, in_features) -> one raw score (B, 1)."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, 1))
