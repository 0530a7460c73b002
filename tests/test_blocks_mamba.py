"""Our Mamba mixer against mamba-ssm's `Mamba` (its pure-PyTorch slow path): init, state_dicts, outputs, gradients,
recurrent decoding, and the kernel code path driven by mamba-ssm's reference functions."""
from __future__ import annotations

import sys

import pytest
import torch

from models.blocks.mamba import Mamba
from models.blocks.ops.dispatch import route_kernels

D_MODEL, BATCH, LENGTH = 24, 2, 13


@pytest.fixture
def ref_module(mamba_ref, monkeypatch):
    """mamba-ssm's modules patched to run on the CPU: reference scan, reference conv, no Triton."""
    m1 = sys.modules["mamba_ssm.modules.mamba_simple"]
    ssi = sys.modules["mamba_ssm.ops.selective_scan_interface"]
    monkeypatch.setattr(m1, "selective_scan_fn", mamba_ref.selective_scan_ref)
    monkeypatch.setattr(m1, "selective_state_update", None)
    # mamba_inner_ref calls these module globals; the conftest set causal_conv1d_fn to None.
    monkeypatch.setattr(ssi, "causal_conv1d_fn", mamba_ref.causal_conv1d_ref)
    monkeypatch.setattr(ssi, "selective_scan_fn", mamba_ref.selective_scan_ref)
    return m1


def kernel_routes(mamba_ref):
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref

    return {
        "mamba_inner_fn": mamba_ref.mamba_inner_ref,
        "selective_scan_fn": mamba_ref.selective_scan_ref,
        "causal_conv1d_fn": mamba_ref.causal_conv1d_ref,
        "causal_conv1d_update": mamba_ref.causal_conv1d_update_ref,
        "selective_state_update": selective_state_update_ref,
    }


def forward_backward(module, x):
    """Output and the gradients of a fixed random projection of it w.r.t. the input and every parameter."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    grads["input"] = x.grad.clone()
    module.zero_grad()
    return out.detach(), grads


def assert_same(a, b, tol=1e-4):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_init_and_state_dict_equal_mamba_ssm(ref_module):
    """Same seed -> bit-identical parameters (same shapes, init rules and order of random draws)."""
    kwargs = dict(d_model=D_MODEL, d_state=8, d_conv=3, expand=2, dt_rank=5, dt_min=0.01, dt_max=0.2, bias=True)
    torch.manual_seed(0)
    ref = ref_module.Mamba(**kwargs, use_fast_path=False)
    torch.manual_seed(0)
    ours = Mamba(**kwargs)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for k in sd_ref:
        assert sd_ref[k].dtype == sd_ours[k].dtype and torch.equal(sd_ref[k], sd_ours[k]), k
    assert ours.A_log._no_weight_decay and ours.D._no_weight_decay and ours.dt_proj.bias._no_reinit
    assert (ours.dt_rank, ours.d_inner) == (ref.dt_rank, ref.d_inner)


def test_outputs_and_grads_equal_mamba_ssm_both_directions(ref_module):
    torch.manual_seed(1)
    ref = ref_module.Mamba(D_MODEL, use_fast_path=False)
    ours = Mamba(D_MODEL)  # different random init, then overwritten
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    assert_same(forward_backward(ours, x), forward_backward(ref, x))

    torch.manual_seed(2)
    ours2 = Mamba(D_MODEL)
    ref.load_state_dict(ours2.state_dict(), strict=True)
    assert_same(forward_backward(ours2, x), forward_backward(ref, x))


def test_decoding_steps_equal_the_parallel_form(ref_module, mamba_ref):
    """Prefill 5 tokens, then decode the rest one by one: same outputs as the full forward and as mamba-ssm's step."""
    torch.manual_seed(3)
    ours = Mamba(D_MODEL, layer_idx=0).eval()
    ref = ref_module.Mamba(D_MODEL, layer_idx=0, use_fast_path=False).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        full = ours(x)
        outs = {}
        for name, module in (("ours", ours), ("ref", ref)):
            params = mamba_ref.InferenceParams(max_seqlen=LENGTH, max_batch_size=BATCH)
            pieces = [module(x[:, :5], inference_params=params)]
            for t in range(5, LENGTH):
                params.seqlen_offset = t
                pieces.append(module(x[:, t : t + 1], inference_params=params))
            outs[name] = torch.cat(pieces, dim=1)
            outs[name + "_states"] = params.key_value_memory_dict[0]
    torch.testing.assert_close(outs["ours"], full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["ref"], full, rtol=1e-4, atol=1e-5)
    for a, b in zip(outs["ours_states"], outs["ref_states"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_allocate_inference_cache_shapes():
    m = Mamba(D_MODEL, d_state=8, d_conv=3)
    conv_state, ssm_state = m.allocate_inference_cache(3, 100)
    assert conv_state.shape == (3, 2 * D_MODEL, 3) and ssm_state.shape == (3, 2 * D_MODEL, 8)


@pytest.mark.parametrize("use_fast_path", [True, False])
def test_kernel_path_equals_portable_path(ref_module, mamba_ref, use_fast_path):
    """Routing the CUDA code path to mamba-ssm's references (mamba_inner_fn, or conv + scan kernels) gives the
    portable path's outputs and gradients: every argument reaches the kernels right."""
    torch.manual_seed(4)
    m = Mamba(D_MODEL, use_fast_path=use_fast_path, bias=True)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    portable = forward_backward(m, x)
    with route_kernels(kernel_routes(mamba_ref)):
        routed = forward_backward(m, x)
    assert_same(routed, portable)


def test_kernel_path_decoding(ref_module, mamba_ref):
    """Prefill + step through the routed kernels (conv, scan with last state, conv update, state update)."""
    torch.manual_seed(5)
    m = Mamba(D_MODEL, layer_idx=0).eval()
    x = torch.randn(BATCH, 7, D_MODEL)
    with torch.no_grad():
        full = m(x)
        with route_kernels(kernel_routes(mamba_ref)):
            params = mamba_ref.InferenceParams(max_seqlen=7, max_batch_size=BATCH)
            pieces = [m(x[:, :4], inference_params=params)]
            for t in range(4, 7):
                params.seqlen_offset = t
                pieces.append(m(x[:, t : t + 1], inference_params=params))
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


def test_bfloat16_runs_close_to_float32():
    torch.manual_seed(6)
    m = Mamba(D_MODEL)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    ref = m(x)
    out = m.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
