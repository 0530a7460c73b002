"""The causal depthwise conv op (and its decoding step) against causal-conv1d's references."""
from __future__ import annotations

import pytest
import torch
from test_blocks_support import assert_close

from models.blocks.ops.causal_conv import causal_conv1d_fn, causal_conv1d_update


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
