"""The pre-norm residual Block against mamba-ssm's Block."""
from __future__ import annotations

import torch
from test_blocks_support import assert_close
from torch import nn

from models.blocks.norm import RMSNorm
from models.blocks.residual import Block


class _Mixer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, inference_params=None):
        return self.proj(x)


def test_block_matches_mamba_ssm_block(mamba_ref):
    from mamba_ssm.modules.block import Block as TheirBlock

    torch.manual_seed(5)
    ours = Block(16, _Mixer, norm_cls=RMSNorm, residual_in_fp32=True)
    theirs = TheirBlock(16, _Mixer, nn.Identity, norm_cls=RMSNorm, fused_add_norm=False, residual_in_fp32=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert sorted(ours.state_dict()) == ["mixer.proj.bias", "mixer.proj.weight", "norm.weight"]
    h = torch.randn(2, 5, 16)
    h1, r1 = ours(h)
    t1, s1 = theirs(h)
    assert r1.dtype == s1.dtype == torch.float32
    assert_close(h1, t1, 1e-6)
    h2, r2 = ours(h1, r1)
    t2, s2 = theirs(t1, s1)
    assert_close(h2, t2, 1e-6)
    assert_close(r2, s2, 1e-6)


def test_block_drop_path_only_in_training():
    torch.manual_seed(6)
    blk = Block(8, _Mixer, drop_path=0.5)
    h, r = torch.randn(16, 3, 8), torch.randn(16, 3, 8)
    blk.eval()
    ref = blk(h, r)[1]
    assert_close(ref, h + r, 1e-6)
    blk.train()
    res = blk(h, r)[1]
    dropped = ((res - r).abs().amax(dim=(1, 2)) < 1e-7)
    assert dropped.any() and not dropped.all()
