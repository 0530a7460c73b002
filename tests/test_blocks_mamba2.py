"""The portable SSD scan and the Mamba2 mixer against mamba-ssm's references (ssd_minimal_discrete, its Mamba2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import repeat
from test_blocks_support import assert_close, cpu_references

from models.blocks import ssd
from models.blocks.mamba2 import Mamba2
from models.blocks.ssd import (
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


@pytest.mark.parametrize("path", ["factored", "segsum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_ssd_scan_matches_ssd_minimal_discrete(mamba_ref, monkeypatch, shape, dtype, path):
    """Outputs, final state and gradients of every input (incl. the initial state) vs ssd_minimal_discrete, on both
    intra-chunk paths (factored decay, and the per-head decay matrix used when a chunk decays a lot)."""
    if path == "segsum":
        monkeypatch.setattr(ssd, "_FACTOR_RANGE", {torch.float64: -1.0, torch.float32: -1.0})
    b, seqlen, h, p, g, n, chunk = shape
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


# ------------------------------------------------------------------------------------------------------------------
MAMBA2_CONFIGS = {
    "default": dict(d_model=32, d_state=16, headdim=8, chunk_size=16),
    "groups_Dhdim": dict(d_model=32, d_state=8, headdim=16, ngroups=2, D_has_hdim=True, chunk_size=8),
    "no_rmsnorm_bias": dict(d_model=24, d_state=8, headdim=12, rmsnorm=False, bias=True, chunk_size=16),
    "d_ssm_limit": dict(d_model=32, d_state=8, headdim=8, d_ssm=32, dt_limit=(0.01, 0.08), conv_init=0.3,
                        norm_before_gate=True, chunk_size=16),
}


def _pair(ref_cpu, cfg, use_mem_eff_path):
    torch.manual_seed(11)
    theirs = ref_cpu.Mamba2(**cfg, use_mem_eff_path=use_mem_eff_path, layer_idx=0)
    torch.manual_seed(11)
    ours = Mamba2(**cfg, use_mem_eff_path=use_mem_eff_path, layer_idx=0)
    return ours, theirs


@pytest.mark.parametrize("name", list(MAMBA2_CONFIGS))
def test_mamba2_same_init_and_state_dict_both_ways(ref_cpu, name):
    ours, theirs = _pair(ref_cpu, MAMBA2_CONFIGS[name], True)
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert list(sd_o) == list(sd_t)
    for k in sd_t:
        assert sd_o[k].shape == sd_t[k].shape and sd_o[k].dtype == sd_t[k].dtype, k
        assert torch.equal(sd_o[k], sd_t[k]), f"{k}: different initialisation"
    with torch.no_grad():
        for prm in theirs.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs2 = ref_cpu.Mamba2(**MAMBA2_CONFIGS[name])
    theirs2.load_state_dict(ours.state_dict(), strict=True)
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), k
    assert {n for n, p_ in ours.named_parameters() if getattr(p_, "_no_weight_decay", False)} == {
        "dt_bias", "A_log", "D"}


@pytest.mark.parametrize("seqlen", [1, 29])
@pytest.mark.parametrize("name", list(MAMBA2_CONFIGS))
def test_mamba2_outputs_and_grads_match_mamba_ssm(ref_cpu, name, seqlen):
    cfg = MAMBA2_CONFIGS[name]
    # mamba-ssm's fused reference supports neither d_ssm < d_inner nor (unlike its kernel) a per-group norm: use
    # its unfused path there. Ours is checked on both paths.
    mem_eff_ref = "d_ssm" not in cfg and cfg.get("ngroups", 1) == 1
    ours, theirs = _pair(ref_cpu, cfg, mem_eff_ref)
    with torch.no_grad():
        for prm in theirs.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    ours.load_state_dict(theirs.state_dict())
    u = torch.randn(2, seqlen, cfg["d_model"], requires_grad=True)
    y_ref = theirs(u)
    g_ref = torch.autograd.grad(_loss([y_ref]), [u, *theirs.parameters()])
    for mem_eff in (True, False):
        ours.use_mem_eff_path = mem_eff
        y = ours(u)
        assert_close(y, y_ref, 1e-5, f"out (mem_eff={mem_eff})")
        g = torch.autograd.grad(_loss([y]), [u, *ours.parameters()])
        for (pname, _), a, r in zip([("input", None), *ours.named_parameters()], g, g_ref):
            assert_close(a, r, 1e-4, f"grad {pname} (mem_eff={mem_eff})")


def test_mamba2_flattened_seqlen_input():
    torch.manual_seed(12)
    m = Mamba2(d_model=16, d_state=8, headdim=8, chunk_size=8)
    u = torch.randn(2, 11, 16)
    assert_close(m(u.reshape(22, 16), seqlen=11), m(u).reshape(22, 16), 1e-6)


@pytest.mark.parametrize("name", ["default", "groups_Dhdim", "no_rmsnorm_bias", "d_ssm_limit"])
def test_mamba2_step_agrees_with_parallel_form(ref_cpu, name):
    """Prefill a prompt through inference_params, then decode token by token: same as the parallel forward. For
    configs mamba-ssm's step supports (no dt_limit, which it ignores; no D_has_hdim), also the same as its step."""
    cfg = MAMBA2_CONFIGS[name]
    ours, theirs = _pair(ref_cpu, cfg, False)
    with torch.no_grad():
        for prm in ours.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    theirs.load_state_dict(ours.state_dict())
    total, prompt = 13, 5
    u = torch.randn(2, total, cfg["d_model"])
    with torch.no_grad():
        y_par = ours(u)
        params, params_ref = ref_cpu.InferenceParams(total, 2), ref_cpu.InferenceParams(total, 2)
        outs = [ours(u[:, :prompt], inference_params=params)]
        check_ref = "dt_limit" not in cfg and not cfg.get("D_has_hdim")  # mamba-ssm's step breaks on D (h*p,)
        if check_ref:
            theirs(u[:, :prompt], inference_params=params_ref)
        for t in range(prompt, total):
            params.seqlen_offset = params_ref.seqlen_offset = t
            outs.append(ours(u[:, t:t + 1], inference_params=params))
            if check_ref:
                assert_close(outs[-1], theirs(u[:, t:t + 1], inference_params=params_ref), 1e-5, f"step {t} vs ref")
    assert_close(torch.cat(outs, dim=1), y_par, 1e-5, "recurrent vs parallel")
    conv_state, ssm_state = params.key_value_memory_dict[0]
    assert conv_state.shape == ours.allocate_inference_cache(2, total)[0].shape
    assert ssm_state.shape == (2, ours.nheads, ours.headdim, ours.d_state)


def test_mamba2_prompt_shorter_than_conv_window():
    torch.manual_seed(13)
    m = Mamba2(d_model=16, d_state=8, headdim=8, chunk_size=8, layer_idx=3)
    u = torch.randn(1, 6, 16)
    params = type("P", (), {"key_value_memory_dict": {}, "seqlen_offset": 0})()
    with torch.no_grad():
        outs = [m(u[:, :2], inference_params=params)]
        for t in range(2, 6):
            params.seqlen_offset = t
            outs.append(m(u[:, t:t + 1], inference_params=params))
        assert_close(torch.cat(outs, 1), m(u), 1e-5)
