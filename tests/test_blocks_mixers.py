"""Properties every mixer has: float32 ops under bf16 autocast, and no host synchronisation in a forward pass."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_blocks_support import assert_close
from torch import nn

from models.blocks.bidirectional import BidirectionalMamba2
from models.blocks.mamba import Mamba
from models.blocks.mamba2 import Mamba2
from models.blocks.mha import MHA
from models.blocks.norm import RMSNorm
from models.blocks.residual import Block
from models.blocks.ss2d import SS2D
from models.blocks.vim import BidirectionalMamba

# name -> (factory, input shape). Sizes are micro; lengths not multiples of the chunk.
MIXERS = {
    "Mamba": (lambda: Mamba(16, d_state=8), (2, 13, 16)),
    "Mamba2": (lambda: Mamba2(32, d_state=16, headdim=8, chunk_size=8), (2, 19, 32)),
    "BidirectionalMamba2": (lambda: BidirectionalMamba2(32, d_state=16, headdim=8, chunk_size=8), (2, 19, 32)),
    "BidirectionalMamba2-legacy": (lambda: BidirectionalMamba2(32, d_state=16, headdim=8, chunk_size=8,
                                                               scan_mode="legacy"), (2, 19, 32)),
    "Vim": (lambda: BidirectionalMamba(16, d_state=8), (2, 13, 16)),
    "SS2D": (lambda: SS2D(16, d_state=8), (2, 3, 5, 16)),
}


def _build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = MIXERS[name]
    torch.manual_seed(seed)
    m = factory()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m, torch.randn(shape)


def _float32_despite_autocast(fn):
    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return fn(*(a.float() if torch.is_tensor(a) else a for a in args), **kwargs)

    return wrapped


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_under_bf16_autocast_computes_its_ops_in_float32(name, monkeypatch):
    """Under CPU bf16 autocast a mixer's ops (scan, SSD, conv, norms) compute in float32, as the kernels do.

    The projections (Linear, SS2D's einsum projections and conv2d) are autocast's to choose and would be bf16 with
    the kernels too, so they are kept in float32 here: what remains is the ops, which must then agree with a
    float64 run of the same weights to float32 precision (bf16 matrix products inside an op give ~1e-3)."""
    m, u = _build(name)
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        y64 = m64(u.double())
        monkeypatch.setattr(F, "linear", _float32_despite_autocast(F.linear))
        monkeypatch.setattr(torch, "einsum", _float32_despite_autocast(torch.einsum))
        monkeypatch.setattr(nn.Conv2d, "forward", _float32_despite_autocast(nn.Conv2d.forward))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(u)
    assert y.dtype == torch.float32
    assert_close(y.double(), y64, 2e-5, name)


def test_autocast_keeps_the_projection_dtype_and_returns_bf16():
    """Without the float32 projections: in_proj gives bf16 under autocast, the ops compute in float32 and hand bf16
    on (like the kernels); the output stays close to float32."""
    m, u = _build("BidirectionalMamba2")
    with torch.no_grad():
        ref = m(u)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(u)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), ref, 3e-2)


def _no_sync(*args, **kwargs):
    raise AssertionError("host synchronisation in a forward pass")


@pytest.mark.parametrize("name", [*MIXERS, "MHA", "Block"])
def test_forward_has_no_host_synchronisation(name, monkeypatch):
    """`.item()`, `.tolist()`, `bool(tensor)` (python `if tensor`) and `float(tensor)` stall a GPU; none may run in a
    forward pass of a block (patched to raise while the forward runs). (The portable SSD reads one value of a CPU
    tensor from host memory to pick its intra-chunk path; on a device it never reads one.)"""
    if name == "MHA":
        torch.manual_seed(0)
        m, u = MHA(32, num_heads=2, head_dim=16, d_conv=4, rotary_emb_dim=8), torch.randn(2, 7, 32)
    elif name == "Block":
        torch.manual_seed(0)
        m = Block(32, lambda d: BidirectionalMamba2(d, d_state=16, headdim=8, chunk_size=8), RMSNorm)
        u = torch.randn(2, 9, 32)
    else:
        m, u = _build(name)
    for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, attr, _no_sync)
    out = m(u) if name != "Block" else m(u, torch.randn_like(u))[0]
    monkeypatch.undo()
    assert torch.isfinite(out).all()
