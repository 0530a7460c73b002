"""The SSD ops (chunked scan, fused layer body, decoding step) against mamba-ssm's references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import repeat
from test_blocks_support import assert_close, cpu_references

from models.blocks.ops import ssd
from models.blocks.ops.ssd import (
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    ssd_state_update,
)


@pytest.fixture
def ref_cpu(mamba_ref, monkeypatch):
    """mamba-ssm's references, runnable on the CPU for this test (see test_blocks_support)."""
    return cpu_references(mamba_ref, monkeypatch)


TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def _scan_inputs(b, seqlen, h, p, g, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seqlen, h, p, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(b, seqlen, h, generator=gen, dtype=dtype) - 1)
    A = -torch.exp(torch.rand(h, generator=gen, dtype=dtype))
    B = torch.randn(b, seqlen, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, seqlen, g, n, generator=gen, dtype=dtype)
    init = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C, init)]


def _loss(outs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)


# (batch, seqlen, heads, headdim, groups, d_state, chunk): length 1, shorter than a chunk, not a multiple, multiple
SHAPES = [(1, 1, 2, 4, 1, 8, 16), (2, 5, 4, 8, 2, 8, 16), (2, 37, 4, 8, 2, 16, 8), (1, 64, 3, 16, 1, 32, 16),
          (3, 100, 6, 4, 3, 8, 32)]


@pytest.mark.parametrize("chunking", ["own", "shape's chunk"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_ssd_scan_matches_ssd_minimal_discrete(mamba_ref, monkeypatch, shape, dtype, chunking):
    """Outputs, final state and gradients of every input (incl. the initial state) vs ssd_minimal_discrete, with
    the portable scan's own chunk length (one chunk at these lengths) and with the shape's (state passing)."""
    b, seqlen, h, p, g, n, chunk = shape
    if chunking != "own":
        monkeypatch.setitem(ssd.PORTABLE_CHUNKS, "cpu", (0, chunk))
    x, dt, A, B, C, init = _scan_inputs(b, seqlen, h, p, g, n, dtype, seed=seqlen)
    y, final = mamba_chunk_scan_combined(x, dt, A, B, C, chunk, initial_states=init, return_final_states=True)
    assert y.shape == x.shape and final.shape == init.shape and y.dtype == dtype
    # the reference: heads share their group's B/C; it needs a multiple of the chunk, zero-padding is exact
    pad = (-seqlen) % chunk

    def padded(t):
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))

    Bh, Ch = (repeat(t, "b l g n -> b l (g r) n", r=h // g) for t in (B, C))
    y_ref, final_ref = mamba_ref.ssd_minimal_discrete(padded(x * dt[..., None]), padded(A * dt), padded(Bh),
                                                      padded(Ch), chunk, initial_states=init[:, None])
    y_ref = y_ref[:, :seqlen]
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(final, final_ref, TOL[dtype], "final state")
    inputs = [x, dt, A, B, C, init]
    grads = torch.autograd.grad(_loss([y, final]), inputs)
    grads_ref = torch.autograd.grad(_loss([y_ref, final_ref]), inputs)
    for name, a, r in zip("x dt A B C init".split(), grads, grads_ref):
        assert_close(a, r, TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ssd_scan_with_strong_decay(mamba_ref, dtype):
    """Per-step log-decays of ~-20 (a chunk decays by e^-1000): no overflow, no NaN, same as the reference."""
    x, dt, A, B, C, init = (t.detach() for t in _scan_inputs(2, 80, 4, 8, 1, 16, dtype, seed=5))
    dt = (dt + 4.0).requires_grad_()
    A = (A * 5).requires_grad_()
    y, final = mamba_chunk_scan_combined(x, dt, A, B, C, 64, initial_states=init, return_final_states=True)
    pad = (-80) % 64
    Bh, Ch = (F.pad(repeat(t, "b l g n -> b l (g r) n", r=4), (0, 0, 0, 0, 0, pad)) for t in (B, C))
    y_ref, final_ref = mamba_ref.ssd_minimal_discrete(F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad)),
                                                      F.pad(A * dt, (0, 0, 0, pad)), Bh, Ch, 64,
                                                      initial_states=init[:, None])
    assert torch.isfinite(y).all()
    assert_close(y, y_ref[:, :80], TOL[dtype], "y")
    assert_close(final, final_ref, TOL[dtype], "final")
    g, g_ref = (torch.autograd.grad(_loss([a, f]), [dt, A]) for a, f in ((y, final), (y_ref[:, :80], final_ref)))
    for a, r in zip(g, g_ref):
        assert torch.isfinite(a).all()
        assert_close(a, r, TOL[dtype], "grad")


def test_ssd_scan_bfloat16_close_to_float32():
    x, dt, A, B, C, _ = _scan_inputs(2, 50, 4, 8, 1, 16, torch.float32, seed=3)
    y32 = mamba_chunk_scan_combined(x, dt, A, B, C, 16)
    y16 = mamba_chunk_scan_combined(*(t.bfloat16() for t in (x, dt, A, B, C)), 16)
    assert y16.dtype == torch.bfloat16
    assert_close(y16.float(), y32, 3e-2)
    y16.float().sum().backward()  # backward works in bf16


@pytest.mark.parametrize("D_shape", ["h", "hp"])
def test_ssd_scan_options_match_reference_wrapper(ref_cpu, D_shape):
    """D (per head or per channel), z gate, dt_bias + softplus and dt_limit, vs the ssd_minimal wrapper."""
    torch.manual_seed(7)
    b, seqlen, h, p, g, n = 2, 45, 4, 8, 2, 16
    x = torch.randn(b, seqlen, h, p, dtype=torch.float64, requires_grad=True)
    dt = torch.randn(b, seqlen, h, dtype=torch.float64, requires_grad=True)
    A = (-torch.rand(h, dtype=torch.float64) - 0.2).requires_grad_()
    B, C = (torch.randn(b, seqlen, g, n, dtype=torch.float64, requires_grad=True) for _ in range(2))
    D = torch.randn(h if D_shape == "h" else (h, p), dtype=torch.float64, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True)
    bias = torch.randn(h, dtype=torch.float64, requires_grad=True)
    kw = dict(D=D, z=z, dt_bias=bias, dt_softplus=True, dt_limit=(0.05, 1.5))
    y = mamba_chunk_scan_combined(x, dt, A, B, C, 16, **kw)
    y_ref = ref_cpu.ssd_minimal_scan(x, dt, A, B, C, 16, **kw)
    assert_close(y, y_ref, 1e-10)
    inputs = [x, dt, A, B, C, D, z, bias]
    for a, r in zip(torch.autograd.grad(_loss([y]), inputs), torch.autograd.grad(_loss([y_ref]), inputs)):
        assert_close(a, r, 1e-9, "grad")


@pytest.mark.parametrize("rmsnorm,norm_before_gate,g", [(True, False, 1), (True, True, 1), (False, False, 2)])
def test_fused_twin_matches_mamba_split_conv1d_scan_ref(ref_cpu, rmsnorm, norm_before_gate, g):
    """(The reference normalises over all channels, the kernel per group: they agree only for one group.)"""
    torch.manual_seed(8)
    b, seqlen, h, p, n, w = 2, 33, 4, 8, 16, 4
    dim = h * p
    zxbcdt = torch.randn(b, seqlen, 2 * dim + 2 * g * n + h, requires_grad=True)
    conv_w = (torch.randn(dim + 2 * g * n, w) * 0.5).requires_grad_()
    conv_b = torch.randn(dim + 2 * g * n, requires_grad=True)
    dt_bias = torch.randn(h, requires_grad=True)
    A = (-torch.rand(h) - 0.5).requires_grad_()
    D = torch.randn(h, requires_grad=True)
    norm_w = torch.randn(dim, requires_grad=True) if rmsnorm else None
    out_w, out_b = torch.randn(24, dim, requires_grad=True), torch.randn(24, requires_grad=True)
    args = (zxbcdt, conv_w, conv_b, dt_bias, A, D, 16)
    kw = dict(rmsnorm_weight=norm_w, rmsnorm_eps=1e-5, outproj_weight=out_w, outproj_bias=out_b, headdim=p,
              ngroups=g, norm_before_gate=norm_before_gate)
    out = mamba_split_conv1d_scan_combined(*args, **kw)
    ref = ref_cpu.mamba_split_conv1d_scan_ref(*args, **kw)
    assert out.shape == (b, seqlen, 24)
    assert_close(out, ref, 1e-4)
    inputs = [t for t in (zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, out_b) if t is not None]
    for a, r in zip(torch.autograd.grad(_loss([out]), inputs), torch.autograd.grad(_loss([ref]), inputs)):
        assert_close(a, r, 1e-4, "grad")


def test_state_update_matches_selective_state_update_ref_and_scan(ref_cpu):
    torch.manual_seed(9)
    b, seqlen, h, p, g, n = 2, 6, 4, 8, 2, 16
    x, dt, A, B, C, init = (t.detach() for t in _scan_inputs(b, seqlen, h, p, g, n, torch.float32, seed=9))
    D, z, bias = torch.randn(h), torch.randn(b, seqlen, h, p), torch.randn(h)
    y_par = mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=D, z=z, dt_bias=bias, dt_softplus=True,
                                      initial_states=init)
    state, state_ref = init.clone(), init.clone()
    for t in range(seqlen):
        y = ssd_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D, z=z[:, t], dt_bias=bias,
                             dt_softplus=True)
        y_ref = ref_cpu.selective_state_update_ref(
            state_ref, x[:, t], repeat(dt[:, t], "b h -> b h p", p=p), repeat(A, "h -> h p n", p=p, n=n),
            B[:, t], C[:, t], D=repeat(D, "h -> h p", p=p), z=z[:, t], dt_bias=repeat(bias, "h -> h p", p=p),
            dt_softplus=True)
        assert_close(y, y_ref, 1e-5, f"step {t} vs ref")
        assert_close(state, state_ref, 1e-5, f"state {t}")
        assert_close(y, y_par[:, t], 1e-4, f"step {t} vs parallel")


@pytest.mark.parametrize("seqlen", [1, 2, 63, 64, 65, 256, 257, 300, 1025])
def test_every_chunk_length_the_op_picks_matches_the_reference(mamba_ref, seqlen):
    """The portable scan picks its chunk length per device and length (`portable_chunk_len`): one chunk up to a
    length, equal chunks beyond. Each pick gives ssd_minimal_discrete's outputs, final state and gradients."""
    q = ssd.portable_chunk_len(seqlen, torch.device("cpu"))
    single, chunk = ssd.PORTABLE_CHUNKS["cpu"]
    assert q == seqlen if seqlen <= single else (q <= chunk and -(-seqlen // q) == -(-seqlen // chunk))
    b, h, p, g, n = 1, 2, 4, 1, 8
    x, dt, A, B, C, init = _scan_inputs(b, seqlen, h, p, g, n, torch.float64, seed=seqlen)
    for with_state in (False, True):
        kw = dict(initial_states=init, return_final_states=True) if with_state else {}
        out = mamba_chunk_scan_combined(x, dt, A, B, C, 256, **kw)
        y, final = out if with_state else (out, None)
        pad = (-seqlen) % 16
        Bp, Cp = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (B, C))
        y_ref, final_ref = mamba_ref.ssd_minimal_discrete(
            F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad)), F.pad(A * dt, (0, 0, 0, pad)), Bp, Cp, 16,
            initial_states=init[:, None] if with_state else None)
        outs, refs = [y], [y_ref[:, :seqlen]]
        assert_close(y, y_ref[:, :seqlen], 1e-9, f"y (chunk {q})")
        if with_state:
            assert_close(final, final_ref, 1e-9, f"final (chunk {q})")
            outs.append(final)
            refs.append(final_ref)
        inputs = [x, dt, A, B, C] + ([init] if with_state else [])
        for a, r in zip(torch.autograd.grad(_loss(outs), inputs), torch.autograd.grad(_loss(refs), inputs)):
            assert_close(a, r, 1e-9, f"grad (chunk {q})")


@pytest.mark.parametrize("scale,expect", [(0.1, "one factored chunk"), (1.0, "shorter factored chunks"),
                                          (30.0, "decay matrices")])
def test_factored_and_exact_paths_match_the_reference(mamba_ref, monkeypatch, scale, expect):
    """The decay strength picks the path: weak, one chunk with factored decays; moderate, the chunk halved until each
    decays by at most FACTOR_SPAN; strong, per-head decay matrices. Each matches ssd_minimal_discrete (float32)."""
    seqlen = 197
    x, dt, A, B, C, init = (t.detach() for t in _scan_inputs(2, seqlen, 4, 8, 2, 16, torch.float32, seed=3))
    dt, A = (dt * scale).requires_grad_(), A.requires_grad_()
    paths = []
    factorable = ssd._factorable
    monkeypatch.setattr(ssd, "_factorable",
                        lambda Acs: paths.append((Acs.shape[-1], factorable(Acs))) or paths[-1][1])
    y, final = mamba_chunk_scan_combined(x, dt, A, B, C, 256, initial_states=init, return_final_states=True)
    q, factored = paths[0]
    assert {"one factored chunk": q == seqlen and factored, "shorter factored chunks": q < seqlen and factored,
            "decay matrices": q == seqlen and not factored}[expect], (q, factored)
    pad = (-seqlen) % 16
    x64, dt64, A64, B64, C64, init64 = (t.double() for t in (x, dt, A, B, C, init))  # a float64 reference
    Bh, Ch = (F.pad(repeat(t, "b l g n -> b l (g r) n", r=2), (0, 0, 0, 0, 0, pad)) for t in (B64, C64))
    y_ref, final_ref = mamba_ref.ssd_minimal_discrete(F.pad(x64 * dt64[..., None], (0, 0, 0, 0, 0, pad)),
                                                      F.pad(A64 * dt64, (0, 0, 0, pad)), Bh, Ch, 16,
                                                      initial_states=init64[:, None])
    assert_close(y.double(), y_ref[:, :seqlen], TOL[torch.float32], "y")
    assert_close(final.double(), final_ref, TOL[torch.float32], "final")
    g = torch.autograd.grad(_loss([y, final]), [dt, A])
    g_ref = torch.autograd.grad(_loss([y_ref[:, :seqlen].float(), final_ref.float()]), [dt, A])
    for a, r in zip(g, g_ref):  # A / dt gradients sum 2 x 197 float32 steps (strong decay: 4e-4 of the largest)
        assert_close(a.double(), r, 5e-4, "grad")
