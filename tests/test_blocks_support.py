"""Shared helpers for the tests/test_blocks_* files: mamba-ssm's references made runnable on the CPU.

`cpu_references(mamba_ref, monkeypatch)` (the `ref_cpu` fixture) points mamba-ssm's modules at their pure-PyTorch references for one test (monkeypatch, undone
afterwards): the Triton/CUDA calls inside `Mamba2`, `mamba_split_conv1d_scan_ref` and the gated RMSNorm module.
`ssd_minimal_scan` is `ssd_minimal_discrete` behind `mamba_chunk_scan_combined`'s signature, and `ref_kernels`
maps every kernel name of `models.blocks.ops.dispatch` to a reference, for `route_kernels`.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from einops import repeat


def ssd_minimal_scan(ssd_minimal_discrete):
    """`ssd_minimal_discrete` wrapped with mamba_chunk_scan_combined's signature (dt bias/softplus/limit, D, z,
    padding to a multiple of the chunk, groups broadcast to heads, initial / final state)."""

    def scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
             return_varlen_states=False):
        assert seq_idx is None and not return_varlen_states
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        b, seqlen, h, p = x.shape
        g = B.shape[2]
        dt = dt.to(cdt)
        if dt_bias is not None:
            dt = dt + dt_bias.to(cdt)
        if dt_softplus:
            dt = F.softplus(dt)
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
        pad = (-seqlen) % chunk_size

        def padded(t):
            return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))

        Bh = repeat(B.to(cdt), "b l g n -> b l (g r) n", r=h // g)
        Ch = repeat(C.to(cdt), "b l g n -> b l (g r) n", r=h // g)
        init = None if initial_states is None else initial_states.to(cdt)[:, None]
        y, final = ssd_minimal_discrete(padded(x.to(cdt) * dt[..., None]), padded(A.to(cdt) * dt), padded(Bh),
                                        padded(Ch), chunk_size, initial_states=init)
        y = y[:, :seqlen]
        if D is not None:
            y = y + x.to(cdt) * (D.to(cdt)[:, None] if D.dim() == 1 else D.to(cdt))
        if z is not None:
            y = y * F.silu(z.to(cdt))
        y = y.to(x.dtype)
        return (y, final) if return_final_states else y

    return scan


def rms_norm_ref_fn(rms_norm_ref):
    """mamba-ssm's `rms_norm_ref` with `rms_norm_fn`'s extra `residual_in_fp32` argument."""

    def fn(x, weight, bias, residual=None, eps=1e-6, dropout_p=0.0, prenorm=False, residual_in_fp32=False):
        assert dropout_p == 0.0
        res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
        out = rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
        return (out[0], out[1].to(res_dtype)) if prenorm else out

    return fn


def _without_seq_idx(fn):
    # mamba-ssm's Mamba2 always passes seq_idx (None); its reference function does not take it.
    def wrapped(*args, seq_idx=None, **kwargs):
        assert seq_idx is None
        return fn(*args, **kwargs)

    return wrapped


@pytest.fixture
def ref_cpu(mamba_ref, monkeypatch) -> types.SimpleNamespace:
    """`cpu_references` as a fixture (other test files define the same three lines, see there)."""
    return cpu_references(mamba_ref, monkeypatch)


def cpu_references(mamba_ref, monkeypatch) -> types.SimpleNamespace:
    """mamba_ref, with mamba-ssm's CUDA/Triton calls inside its modules and `*_ref` helpers swapped for references."""
    import mamba_ssm.modules.mamba2 as m2
    import mamba_ssm.ops.selective_scan_interface as ssi
    from mamba_ssm.ops.triton import layernorm_gated, ssd_combined
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    scan = ssd_minimal_scan(mamba_ref.ssd_minimal_discrete)
    monkeypatch.setattr(ssd_combined, "causal_conv1d_fn", mamba_ref.causal_conv1d_ref)
    monkeypatch.setattr(ssd_combined, "rmsnorm_fn", mamba_ref.gated_rms_norm_ref)
    monkeypatch.setattr(layernorm_gated, "rmsnorm_fn", mamba_ref.gated_rms_norm_ref)
    monkeypatch.setattr(ssi, "selective_scan_fn", mamba_ref.selective_scan_ref)
    monkeypatch.setattr(m2, "mamba_chunk_scan_combined", scan)
    monkeypatch.setattr(m2, "mamba_split_conv1d_scan_combined", _without_seq_idx(mamba_ref.mamba_split_conv1d_scan_ref))
    monkeypatch.setattr(m2, "selective_state_update", selective_state_update_ref)
    monkeypatch.setattr(m2, "causal_conv1d_fn", None)
    monkeypatch.setattr(m2, "causal_conv1d_update", None)
    return types.SimpleNamespace(
        **vars(mamba_ref),
        ssd_minimal_scan=scan,
        selective_state_update_ref=selective_state_update_ref,
        kernels={
            "selective_scan_fn": mamba_ref.selective_scan_ref,
            "mamba_inner_fn": mamba_ref.mamba_inner_ref,
            "causal_conv1d_fn": mamba_ref.causal_conv1d_ref,
            "causal_conv1d_update": mamba_ref.causal_conv1d_update_ref,
            "mamba_chunk_scan_combined": scan,
            "mamba_split_conv1d_scan_combined": mamba_ref.mamba_split_conv1d_scan_ref,
            "rms_norm_fn": rms_norm_ref_fn(mamba_ref.rms_norm_ref),
            "rmsnorm_fn": mamba_ref.gated_rms_norm_ref,
            "selective_state_update": selective_state_update_ref,
        },
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "", atol: float = 1e-7) -> None:
    """max |actual - expected| <= atol + rtol * max |expected|: error relative to the reference's magnitude (robust
    to near-zero entries); atol only matters for quantities that are exactly zero in theory (rounding residue)."""
    diff = (actual.detach() - expected.detach()).abs().max().item()
    scale = expected.detach().abs().max().item()
    assert diff <= atol + rtol * scale, f"{name}: max error {diff:.3g} vs reference magnitude {scale:.3g}"


def test_ssd_minimal_wrapper_matches_mamba_reference_scan(ref_cpu):
    """The wrapper itself agrees with mamba-ssm's other reference (its chunked `ssd_chunk_scan_combined_ref`)."""
    torch.manual_seed(0)
    b, seqlen, h, p, g, n = 2, 48, 4, 8, 2, 16
    x = torch.randn(b, seqlen, h, p, dtype=torch.float64)
    dt = torch.randn(b, seqlen, h, dtype=torch.float64)
    A = -torch.rand(h, dtype=torch.float64) - 0.5
    B, C = torch.randn(2, b, seqlen, g, n, dtype=torch.float64)
    D, z = torch.randn(h, dtype=torch.float64), torch.randn_like(x)
    bias = torch.randn(h, dtype=torch.float64)
    y = ref_cpu.ssd_minimal_scan(x, dt, A, B, C, 16, D=D, z=z, dt_bias=bias, dt_softplus=True)
    y_ref = ref_cpu.ssd_combined.ssd_chunk_scan_combined_ref(x, dt, A, B, C, 16, D=D, z=z, dt_bias=bias,
                                                            dt_softplus=True)
    assert_close(y, y_ref, 1e-6)  # the reference casts dt to float32
