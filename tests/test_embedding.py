"""zoo.embedding.Embedder: face and hand share one `embed` (eval mode, chunks, CPU float32, a dict key or not)."""
from __future__ import annotations

import torch
from torch import nn

from zoo.embedding import Embedder


class Net(Embedder, nn.Module):
    def __init__(self, key=None):
        super().__init__()
        self.EMBEDDING_KEY = key
        self.lin, self.drop = nn.Linear(4, 3), nn.Dropout(0.9)

    @property
    def device(self):
        return self.lin.weight.device

    def forward(self, x):
        y = self.drop(self.lin(x.flatten(1)))
        return y if self.EMBEDDING_KEY is None else {"embedding": y, "other": y * 0}


def test_embed_runs_in_eval_mode_in_chunks():
    x = torch.randn(7, 1, 2, 2, dtype=torch.float64)
    net = Net().double()
    out = net.embed(x, batch_size=3)
    assert out.dtype == torch.float32 and out.shape == (7, 3) and not net.training
    assert torch.allclose(out, net.lin(x.flatten(1)).float())  # no dropout: eval mode
    keyed = Net("embedding")
    keyed.load_state_dict(net.float().state_dict())
    assert torch.allclose(keyed.embed(x.float(), batch_size=2), out, atol=1e-6)


def test_face_and_hand_share_it():
    from models.face.module import FaceEmbedder
    from models.hand.module import HandBiometrics

    assert FaceEmbedder.embed is HandBiometrics.embed is Embedder.embed
    assert HandBiometrics.EMBEDDING_KEY == "embedding" and FaceEmbedder.EMBEDDING_KEY is None
