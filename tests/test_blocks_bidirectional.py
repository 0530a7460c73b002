"""BidirectionalMamba2: the published DeMansia 2 mixer (legacy) and the true bidirectional default."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange
from test_blocks_support import assert_close, cpu_references

from models.blocks.bidirectional import BidirectionalMamba2, swap_directions
from models.blocks.mamba2 import Mamba2


@pytest.fixture
def ref_cpu(mamba_ref, monkeypatch):
    """mamba-ssm's references, runnable on the CPU for this test (see test_blocks_support)."""
    return cpu_references(mamba_ref, monkeypatch)


TINY = dict(d_model=192, d_state=128, headdim=48, expand=2, chunk_size=256)
SMALL = dict(d_model=32, d_state=16, headdim=8, chunk_size=16)

# The published mixer's state_dict, in its order (registration order of catalpaaa/DeMansia-2's module).
PUBLISHED_KEYS = ["dt_bias", "dt_bias_b", "A_log", "A_log_b", "D", "D_b", "in_proj.weight", "conv1d.weight",
                  "conv1d.bias", "conv1d_b.weight", "conv1d_b.bias", "norm.weight", "norm_b.weight",
                  "out_proj.weight", "out_proj_b.weight"]


def _perturbed(m, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("_b") or not getattr(m, "legacy", False) or name == "D_b":
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return m


def test_legacy_tiny_shapes_keys_and_ties():
    m = BidirectionalMamba2(**TINY, scan_mode="legacy")
    sd = m.state_dict()
    assert list(sd) == PUBLISHED_KEYS
    shapes = {"in_proj.weight": (1032, 192), "conv1d.weight": (640, 1, 4), "conv1d_b.weight": (640, 1, 4),
              "norm.weight": (384,), "norm_b.weight": (384,), "out_proj.weight": (192, 384),
              "out_proj_b.weight": (192, 384), "dt_bias": (8,), "A_log": (8,), "D_b": (8,)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    for name in ("dt_bias", "A_log"):
        fwd, bwd = getattr(m, name), getattr(m, name + "_b")
        assert fwd is not bwd and fwd.data_ptr() == bwd.data_ptr()
    assert torch.equal(m.D_b, torch.ones(8))
    m.double()  # a dtype/device move keeps the tie
    assert m.dt_bias.data_ptr() == m.dt_bias_b.data_ptr() and m.A_log_b.dtype == torch.float64


def test_legacy_matches_published_forward_rebuilt_from_mamba_ssm_reference(ref_cpu):
    """The published forward: mamba_split_conv1d_scan_ref twice, branch 2 on the channel-flipped in_proj output
    with conv1d_b, dt_bias_b, A_log_b, the *forward* D, norm_b, out_proj_b; (out + out_b.flip(-1)) / 2."""
    torch.manual_seed(1)
    m = _perturbed(BidirectionalMamba2(**SMALL, scan_mode="legacy"))
    u = torch.randn(2, 21, 32, requires_grad=True)

    def published(u):
        zxbcdt = m.in_proj(u)

        def fused(zxbcdt, conv, dt_bias, A_log, D, norm, out_proj):
            return ref_cpu.mamba_split_conv1d_scan_ref(
                zxbcdt, rearrange(conv.weight, "d 1 w -> d w"), conv.bias, dt_bias, -torch.exp(A_log.float()), D,
                chunk_size=16, activation="silu", rmsnorm_weight=norm.weight, rmsnorm_eps=norm.eps,
                outproj_weight=out_proj.weight, outproj_bias=out_proj.bias, headdim=8, ngroups=1,
                norm_before_gate=False)

        out = fused(zxbcdt, m.conv1d, m.dt_bias, m.A_log, m.D, m.norm, m.out_proj)
        out_b = fused(zxbcdt.flip([-1]), m.conv1d_b, m.dt_bias_b, m.A_log_b, m.D, m.norm_b, m.out_proj_b)
        return (out + out_b.flip([-1])) / 2

    y, y_ref = m(u), published(u)
    assert_close(y, y_ref, 1e-5, "out")
    params = [u] + [p for _, p in m.named_parameters()]
    names = ["input"] + [n for n, _ in m.named_parameters()]
    g_ref = torch.autograd.grad(y_ref.square().sum(), params, allow_unused=True)
    g = torch.autograd.grad(y.square().sum(), params, allow_unused=True)
    for name, a, r in zip(names, g, g_ref):
        if r is None:
            assert a is None, name
        else:
            assert_close(a, r, 1e-4, f"grad {name}")
    assert dict(zip(names, g))["D_b"] is None  # exists, never used


def test_default_reversed_input_with_swapped_directions_gives_reversed_output():
    torch.manual_seed(2)
    m = _perturbed(BidirectionalMamba2(**SMALL), seed=2)
    swapped = BidirectionalMamba2(**SMALL)
    swapped.load_state_dict(swap_directions(m.state_dict()))
    u = torch.randn(2, 19, 32)
    with torch.no_grad():
        assert_close(swapped(u.flip(1)), m(u).flip(1), 1e-5)
        # and it is not trivially symmetric: the unswapped module gives something else
        assert (m(u.flip(1)) - m(u).flip(1)).abs().max() > 1e-3


def test_default_sees_the_future_and_legacy_does_not():
    torch.manual_seed(3)
    u = torch.randn(1, 12, 32)
    u2 = u.clone()
    u2[:, -1] += 1.0
    for legacy, sees in ((False, True), (True, False)):
        m = BidirectionalMamba2(**SMALL, scan_mode="legacy" if legacy else "bidirectional")
        with torch.no_grad():
            delta = (m(u2)[:, 0] - m(u)[:, 0]).abs().max().item()
        assert (delta > 1e-4) == sees, (legacy, delta)
    with torch.no_grad():
        causal = Mamba2(**SMALL)
        # causal up to rounding (the chunk's decay centre includes later tokens)
        assert (causal(u2)[:, :-1] - causal(u)[:, :-1]).abs().max() < 1e-6


def test_default_has_independent_backward_parameters_that_learn():
    torch.manual_seed(4)
    m = BidirectionalMamba2(**SMALL)
    assert list(m.state_dict()) == PUBLISHED_KEYS  # same keys as the published mixer: its weights load
    assert m.dt_bias.data_ptr() != m.dt_bias_b.data_ptr()
    m(torch.randn(2, 9, 32)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_flattened_input_and_unfused_path_agree():
    torch.manual_seed(5)
    m = _perturbed(BidirectionalMamba2(**SMALL), seed=5)
    u = torch.randn(2, 10, 32)
    with torch.no_grad():
        y = m(u)
        assert_close(m(u.reshape(20, 32), seqlen=10), y.reshape(20, 32), 1e-6)
        m.use_mem_eff_path = False
        assert_close(m(u), y, 1e-5)
