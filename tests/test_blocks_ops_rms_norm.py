"""The RMSNorm ops (plain with fused residual add, gated grouped) against mamba-ssm's references."""
from __future__ import annotations

import pytest
import torch
from test_blocks_support import assert_close

from models.blocks.norm import RMSNorm, RMSNormGated


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)



@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rmsnorm_matches_rms_norm_ref(mamba_ref, dtype, tol):
    torch.manual_seed(2)
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 24, dtype=dtype, requires_grad=True)
    out = norm(x)
    ref = mamba_ref.rms_norm_ref(x, norm.weight, None, eps=1e-5, upcast=True)
    assert out.dtype == dtype
    assert_close(out.float(), ref.float(), tol)
    if dtype == torch.float32:
        inputs = [x, norm.weight]
        for a, r in zip(_grads(out, inputs), _grads(ref, inputs)):
            assert_close(a, r, 1e-5, "grad")


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_rmsnorm_fused_residual_add(mamba_ref, residual_in_fp32):
    torch.manual_seed(3)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    # first block: no residual yet
    out, res = norm(x, prenorm=True, residual_in_fp32=residual_in_fp32)
    assert res.dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)
    assert torch.equal(res.float(), x.float())
    # later block: residual given, its dtype is kept
    residual = torch.randn(2, 4, 16, dtype=torch.float32)
    out, res = norm(x, residual=residual, prenorm=True, residual_in_fp32=residual_in_fp32)
    ref, ref_res = mamba_ref.rms_norm_ref(x, norm.weight, None, residual=residual, eps=norm.eps, prenorm=True,
                                          upcast=True)
    assert out.dtype == torch.bfloat16 and res.dtype == torch.float32
    assert_close(out.float(), ref.float(), 1e-2)
    assert_close(res, ref_res.float(), 1e-7)


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_gated_rmsnorm_matches_ref(mamba_ref, group_size, norm_before_gate, gated):
    torch.manual_seed(4)
    norm = RMSNormGated(32, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 32, requires_grad=True)
    z = torch.randn(2, 3, 32, requires_grad=True) if gated else None
    out = norm(x, z)
    ref = mamba_ref.gated_rms_norm_ref(x, norm.weight, None, z=z, eps=1e-5, group_size=group_size,
                                       norm_before_gate=norm_before_gate)
    assert_close(out, ref, 1e-6)
    inputs = [t for t in (x, z, norm.weight) if t is not None]
    for a, r in zip(_grads(out, inputs), _grads(ref, inputs)):
        assert_close(a, r, 1e-5, "grad")
