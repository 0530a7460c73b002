"""Op dispatch (ops/dispatch.py): when kernels are used, and that every mixer plumbs every argument into them correctly.

Without a GPU the kernel code path is exercised by `route_kernels`, which maps each kernel name to mamba-ssm's
same-signature reference: the routed (kernel) path must give the portable path's outputs and gradients.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
from test_blocks_support import assert_close, cpu_references

from models.blocks.bidirectional import BidirectionalMamba2
from models.blocks.mamba2 import Mamba2
from models.blocks.norm import RMSNorm
from models.blocks.ops import dispatch
from models.blocks.ops.causal_conv import causal_conv1d_fn
from models.blocks.ops.dispatch import get_kernel, route_kernels, use_kernels
from models.blocks.residual import Block


@pytest.fixture
def ref_cpu(mamba_ref, monkeypatch):
    """mamba-ssm's references, runnable on the CPU for this test (see test_blocks_support)."""
    return cpu_references(mamba_ref, monkeypatch)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # a fresh Python process (imports torch, Lightning, timm: ~5 s before the test starts)
def test_cpu_never_imports_mamba_ssm():
    # timm (imported by `models`, which registers the zoo's timm names) imports triton on its own, so triton is made
    # unimportable here: the portable path must run without mamba-ssm, causal-conv1d and triton, and import none.
    code = (
        "import sys\n"
        "for name in ('mamba_ssm', 'causal_conv1d', 'triton'):\n"
        "    sys.modules[name] = None\n"
        "import torch\n"
        "from models.blocks.bidirectional import BidirectionalMamba2\n"
        "from models.blocks.ops.dispatch import use_kernels\n"
        "m = BidirectionalMamba2(16, d_state=8, headdim=8, chunk_size=8)\n"
        "m(torch.randn(1, 5, 16)).sum().backward()\n"
        "assert not use_kernels(torch.zeros(1))\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('mamba_ssm', 'causal_conv1d', 'triton') and sys.modules[k]]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_use_kernels_needs_cuda_kernels_and_no_portable_env(monkeypatch):
    assert not use_kernels(torch.zeros(2))
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(dispatch, "_available", False)
    assert not use_kernels(fake_cuda)
    monkeypatch.setattr(dispatch, "_available", True)
    monkeypatch.delenv(dispatch.PORTABLE_ENV, raising=False)
    assert use_kernels(fake_cuda)
    monkeypatch.setenv(dispatch.PORTABLE_ENV, "1")
    assert not use_kernels(fake_cuda)
    monkeypatch.setenv(dispatch.PORTABLE_ENV, "0")
    assert use_kernels(fake_cuda)


def test_route_kernels_scoping():
    def fake(*args, **kwargs):
        return "fake"

    assert not use_kernels(torch.zeros(1))
    with route_kernels({"causal_conv1d_fn": fake}):
        assert use_kernels(torch.zeros(1))
        assert get_kernel("causal_conv1d_fn") is fake
        with pytest.raises(KeyError):
            get_kernel("rmsnorm_fn")  # not routed: the test learns which kernels a block calls
        with route_kernels({"rmsnorm_fn": fake}):
            assert get_kernel("rmsnorm_fn") is fake and get_kernel("causal_conv1d_fn") is fake
    assert not use_kernels(torch.zeros(1))
    with pytest.raises(KeyError):
        with route_kernels({"no_such_kernel": fake}):
            pass


def _counting(mapping):
    calls = collections.Counter()

    def wrap(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    return {k: wrap(k, v) for k, v in mapping.items()}, calls


def _outputs_and_grads(module, u, **kwargs):
    u = u.detach().clone().requires_grad_()
    y = module(u, **kwargs)
    y = y[0] if isinstance(y, tuple) else y
    gen = torch.Generator().manual_seed(0)
    loss = (y * torch.randn(y.shape, generator=gen)).sum()
    names = ["input"] + [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(loss, [u, *module.parameters()], allow_unused=True)
    return y, dict(zip(names, grads))


def _assert_kernel_path_equals_portable(ref_cpu, module, u, expect_called, **kwargs):
    y_port, g_port = _outputs_and_grads(module, u, **kwargs)
    mapping, calls = _counting(ref_cpu.kernels)
    with route_kernels(mapping):
        y_kern, g_kern = _outputs_and_grads(module, u, **kwargs)
    assert set(expect_called) <= set(calls), f"kernels called: {dict(calls)}"
    assert_close(y_kern, y_port, 1e-5, "out")
    for name, gp in g_port.items():
        gk = g_kern[name]
        if gp is None:
            assert gk is None, name
        else:
            assert_close(gk, gp, 1e-4, f"grad {name}")
    return calls


def _perturb(m, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in {p.data_ptr(): p for p in m.parameters()}.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return m


CFG = dict(d_model=32, d_state=16, headdim=8, chunk_size=16)


@pytest.mark.parametrize("extra", [dict(), dict(D_has_hdim=True, dt_limit=(0.01, 0.5), bias=True)])
def test_mamba2_fused_kernel_path(ref_cpu, extra):
    torch.manual_seed(1)
    m = _perturb(Mamba2(**CFG, **extra))
    _assert_kernel_path_equals_portable(ref_cpu, m, torch.randn(2, 23, 32), ["mamba_split_conv1d_scan_combined"])


@pytest.mark.parametrize("extra", [dict(), dict(ngroups=2, rmsnorm=False, d_ssm=32, D_has_hdim=True,
                                                dt_limit=(0.01, 0.5))])
def test_mamba2_unfused_kernel_path(ref_cpu, extra):
    torch.manual_seed(2)
    m = _perturb(Mamba2(**CFG, use_mem_eff_path=False, **extra))
    expect = ["causal_conv1d_fn", "mamba_chunk_scan_combined"] + (["rmsnorm_fn"] if m.rmsnorm else [])
    _assert_kernel_path_equals_portable(ref_cpu, m, torch.randn(2, 23, 32), expect)


@pytest.mark.parametrize("extra", [dict(), dict(ngroups=2, D_has_hdim=True, dt_limit=(0.01, 0.5))])
def test_mamba2_decoding_kernel_path(ref_cpu, extra):
    """Prefill (conv + chunk scan kernels with the final state) and steps (conv update + selective_state_update)."""
    torch.manual_seed(3)
    m = _perturb(Mamba2(**CFG, layer_idx=0, **extra))
    u = torch.randn(2, 9, 32)

    def decode():
        params = ref_cpu.InferenceParams(9, 2)
        outs = [m(u[:, :4], inference_params=params)]
        for t in range(4, 9):
            params.seqlen_offset = t
            outs.append(m(u[:, t:t + 1], inference_params=params))
        return torch.cat(outs, 1), params.key_value_memory_dict[0]

    with torch.no_grad():
        y_port, (conv_p, ssm_p) = decode()
        mapping, calls = _counting(ref_cpu.kernels)
        with route_kernels(mapping):
            y_kern, (conv_k, ssm_k) = decode()
    assert {"causal_conv1d_update", "selective_state_update", "mamba_chunk_scan_combined"} <= set(calls)
    assert_close(y_kern, y_port, 1e-5, "decoded")
    assert_close(conv_k, conv_p, 1e-6, "conv state")
    assert_close(ssm_k, ssm_p, 1e-5, "ssm state")


@pytest.mark.parametrize("legacy", [False, True])
def test_bidirectional_kernel_path(ref_cpu, legacy):
    torch.manual_seed(4)
    m = _perturb(BidirectionalMamba2(**CFG, scan_mode="legacy" if legacy else "bidirectional"))
    calls = _assert_kernel_path_equals_portable(ref_cpu, m, torch.randn(2, 19, 32),
                                                ["mamba_split_conv1d_scan_combined"])
    assert calls["mamba_split_conv1d_scan_combined"] == 2  # one per direction


def test_bidirectional_unfused_kernel_path(ref_cpu):
    torch.manual_seed(5)
    m = _perturb(BidirectionalMamba2(**CFG, use_mem_eff_path=False))
    _assert_kernel_path_equals_portable(ref_cpu, m, torch.randn(2, 19, 32),
                                        ["causal_conv1d_fn", "mamba_chunk_scan_combined", "rmsnorm_fn"])


def test_residual_block_fused_add_norm_kernel_path(ref_cpu):
    torch.manual_seed(6)
    blk = _perturb(Block(32, lambda d: Mamba2(d, d_state=16, headdim=8, chunk_size=16), norm_cls=RMSNorm))
    h, r = torch.randn(2, 11, 32), torch.randn(2, 11, 32)
    with torch.no_grad():
        out_p, res_p = blk(h, r)
        mapping, calls = _counting(ref_cpu.kernels)
        with route_kernels(mapping):
            out_k, res_k = blk(h, r)
    assert calls["rms_norm_fn"] == 1
    assert res_k.dtype == res_p.dtype == torch.float32
    assert_close(out_k, out_p, 1e-5)
    assert_close(res_k, res_p, 1e-6)


def test_conv_kernel_path_with_states(ref_cpu):
    torch.manual_seed(7)
    x, w, b, init = torch.randn(2, 6, 9), torch.randn(6, 4), torch.randn(6), torch.randn(2, 6, 3)
    out_p, fin_p = causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True, activation="silu")
    with route_kernels({"causal_conv1d_fn": ref_cpu.causal_conv1d_ref}):
        out_k, fin_k = causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True, activation="silu")
    assert_close(out_k, out_p, 1e-6)
    assert_close(fin_k, fin_p, 1e-6)


def test_kernel_load_failure_is_reported_once(monkeypatch):
    """mamba-ssm installed but its kernels fail to load (faked): one RuntimeWarning naming the error, then the
    portable path, silently; without mamba-ssm installed no warning at all."""
    def broken(name):
        raise ImportError("libcudart.so.12: cannot open shared object file")

    fake_cuda = types.SimpleNamespace(is_cuda=True)
    monkeypatch.delenv(dispatch.PORTABLE_ENV, raising=False)
    for installed in (True, False):
        fake_importlib = types.SimpleNamespace(
            import_module=broken, util=types.SimpleNamespace(find_spec=lambda name, found=installed: object() if found else None))
        monkeypatch.setattr(dispatch, "importlib", fake_importlib)
        monkeypatch.setattr(dispatch, "_available", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not use_kernels(fake_cuda)
            assert not use_kernels(fake_cuda)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if installed:
            assert len(messages) == 1, messages
            assert "ImportError: libcudart.so.12" in messages[0] and "portable" in messages[0]
        else:
            assert messages == []
