"""Causal conv, RMSNorm, gated RMSNorm and the residual Block against mamba-ssm's / causal-conv1d's references."""
from __future__ import annotations

import pytest
import torch
from test_blocks_support import assert_close
from torch import nn

from models.blocks.conv import causal_conv1d_fn, causal_conv1d_update
from models.blocks.norm import RMSNorm, RMSNormGated
from models.blocks.residual import Block


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias,with_state", [(True, False), (False, True)])
@pytest.mark.parametrize("seqlen", [1, 2, 9])
def test_causal_conv_matches_causal_conv1d_ref(mamba_ref, dtype, tol, activation, with_bias, with_state, seqlen):
    torch.manual_seed(0)
    b, d, w = 2, 6, 4
    x = torch.randn(b, d, seqlen, dtype=dtype, requires_grad=True)
    weight = torch.randn(d, w, dtype=dtype, requires_grad=True)
    bias = torch.randn(d, dtype=dtype, requires_grad=True) if with_bias else None
    init = torch.randn(b, d, w - 1, dtype=dtype, requires_grad=True) if with_state else None
    out, final = causal_conv1d_fn(x, weight, bias, initial_states=init, return_final_states=True,
                                  activation=activation)
    ref, ref_final = mamba_ref.causal_conv1d_ref(x, weight, bias, initial_states=init, return_final_states=True,
                                                 activation=activation)
    assert out.shape == (b, d, seqlen) and out.dtype == dtype
    assert_close(out, ref, tol, "out")
    assert_close(final, ref_final, tol, "final state")
    inputs = [t for t in (x, weight, bias, init) if t is not None]
    for a, r in zip(_grads(out, inputs), _grads(ref, inputs)):
        assert_close(a, r, tol, "grad")


def test_causal_conv_update_steps_equal_full_conv_and_ref(mamba_ref):
    torch.manual_seed(1)
    b, d, w, seqlen = 2, 5, 4, 7
    x = torch.randn(b, d, seqlen)
    weight, bias = torch.randn(d, w), torch.randn(d)
    full = causal_conv1d_fn(x, weight, bias, activation="silu")
    state, state_ref = torch.zeros(b, d, w), torch.zeros(b, d, w)
    for t in range(seqlen):
        y = causal_conv1d_update(x[:, :, t], state, weight, bias, "silu")
        y_ref = mamba_ref.causal_conv1d_update_ref(x[:, :, t], state_ref, weight, bias, "silu")
        assert_close(y, y_ref, 1e-6, "step vs ref")
        assert_close(y, full[:, :, t], 1e-6, "step vs full")
        assert torch.equal(state, state_ref)
    # several new tokens at once, state longer than the window
    state, state_ref = torch.randn(b, d, 6), None
    state_ref = state.clone()
    y = causal_conv1d_update(x[:, :, :3], state, weight, None, None)
    y_ref = mamba_ref.causal_conv1d_update_ref(x[:, :, :3], state_ref, weight, None, None)
    assert_close(y, y_ref, 1e-6, "multi-token update")
    assert torch.equal(state, state_ref)


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


def test_norm_state_dicts_load_both_ways(mamba_ref):
    from mamba_ssm.ops.triton.layer_norm import RMSNorm as TheirRMSNorm
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as TheirGated

    for ours, theirs in ((RMSNorm(8), TheirRMSNorm(8)), (RMSNormGated(8, group_size=4), TheirGated(8, group_size=4))):
        with torch.no_grad():
            theirs.weight.normal_()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        assert torch.equal(ours.weight, theirs.weight)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        assert ours.eps == theirs.eps == 1e-5


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
