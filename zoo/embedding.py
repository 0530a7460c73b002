"""`Embedder`: the `embed` method of the tasks whose network gives an identity embedding (face, hand)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor


class Embedder:
    """Mixin for a LightningModule whose forward gives unit embeddings, directly or under `EMBEDDING_KEY` of a dict
    of outputs. Having `embed` marks a task as one that embeds (e.g. a recogniser for palm's identity metrics)."""

    EMBEDDING_KEY: ClassVar[str | None] = None

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """Embeddings (N, D) float32 on the CPU of a normalised (N, 3, S, S) batch, in eval mode, in chunks."""
        self.eval()
        chunks = []
        for i in range(0, len(images), batch_size):
            out = self(images[i:i + batch_size].to(self.device))
            chunks.append((out if self.EMBEDDING_KEY is None else out[self.EMBEDDING_KEY]).float().cpu())
        return torch.cat(chunks)
