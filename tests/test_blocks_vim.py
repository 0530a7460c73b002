"""BidirectionalMamba (Vim v2 style) against a reference built from mamba-ssm's reference functions."""
from __future__ import annotations

import sys

import pytest
import torch
from einops import rearrange

from models.blocks.mamba import Mamba
from models.blocks.ops.dispatch import route_kernels
from models.blocks.vim import BidirectionalMamba

D_MODEL, BATCH, LENGTH = 16, 2, 11


@pytest.fixture
def refs(mamba_ref, monkeypatch):
    ssi = sys.modules["mamba_ssm.ops.selective_scan_interface"]
    monkeypatch.setattr(ssi, "causal_conv1d_fn", mamba_ref.causal_conv1d_ref)
    monkeypatch.setattr(ssi, "selective_scan_fn", mamba_ref.selective_scan_ref)
    return mamba_ref


def vim_reference(m: BidirectionalMamba, x: torch.Tensor, ref) -> torch.Tensor:
    """Vim v2: y = mamba_inner(xz) + flip(mamba_inner_b(flip(xz))), halved, then out_proj (mamba-ssm's refs)."""
    xz = rearrange(m.in_proj(x), "b l d -> b d l")
    eye = torch.eye(m.d_inner)  # mamba_inner_ref ends in a projection: the identity keeps y (B, L, d_inner)

    def inner(xz_, sfx):
        a_log = m.A_log if not sfx else m.A_b_log
        return ref.mamba_inner_ref(
            xz_, getattr(m, "conv1d" + sfx).weight, getattr(m, "conv1d" + sfx).bias, getattr(m, "x_proj" + sfx).weight,
            getattr(m, "dt_proj" + sfx).weight, eye, None, -torch.exp(a_log.float()), None, None,
            getattr(m, "D" + sfx).float(), delta_bias=getattr(m, "dt_proj" + sfx).bias.float(), delta_softplus=True,
        )

    y = (inner(xz, "") + inner(xz.flip(-1), "_b").flip(1)) / 2
    return m.out_proj(y)


def grads_of(m, x, fn):
    x = x.detach().clone().requires_grad_()
    out = fn(m, x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    grads["input"] = x.grad
    m.zero_grad()
    return out.detach(), grads


def assert_same(a, b, tol=1e-4):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def test_state_dict_keys_are_vims():
    m = BidirectionalMamba(D_MODEL)
    extra = set(m.state_dict()) - set(Mamba(D_MODEL).state_dict())
    assert extra == {"A_b_log", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight",
                     "dt_proj_b.bias", "D_b"}
    assert m.A_b_log.shape == (2 * D_MODEL, 16) and m.D_b._no_weight_decay
    torch.testing.assert_close(torch.nn.functional.softplus(m.dt_proj_b.bias).clamp(max=0.1).max(),
                               torch.nn.functional.softplus(m.dt_proj_b.bias).max())  # Mamba's dt init


def test_matches_vim_reference(refs):
    torch.manual_seed(0)
    m = BidirectionalMamba(D_MODEL, bias=True)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    assert_same(grads_of(m, x, lambda m_, x_: m_(x_)), grads_of(m, x, lambda m_, x_: vim_reference(m_, x_, refs)))


def test_backward_branch_sees_the_future():
    torch.manual_seed(1)
    bi, uni = BidirectionalMamba(D_MODEL), Mamba(D_MODEL)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    x2 = x.clone()
    x2[:, -1] += 10.0
    with torch.no_grad():
        change = (bi(x)[:, 0] - bi(x2)[:, 0]).abs().max() / bi(x)[:, 0].abs().max()
        assert change > 1e-3
        assert torch.equal(uni(x)[:, :-1], uni(x2)[:, :-1])  # the causal mixer does not see it


def test_flip_symmetry():
    """Swapping the forward and backward parameters mirrors the mixer: m_swapped(flip(x)) == flip(m(x))."""
    torch.manual_seed(2)
    m = BidirectionalMamba(D_MODEL)
    sd = m.state_dict()
    pairs = [("conv1d.", "conv1d_b."), ("x_proj.", "x_proj_b."), ("dt_proj.", "dt_proj_b."), ("A_log", "A_b_log"),
             ("D", "D_b")]
    swapped = {}
    for k, v in sd.items():
        for a, b in pairs:
            if k.startswith(a) and (a.endswith(".") or k == a):
                k = b + k[len(a):]
                break
            if k.startswith(b) and (b.endswith(".") or k == b):
                k = a + k[len(b):]
                break
        swapped[k] = v
    m2 = BidirectionalMamba(D_MODEL)
    m2.load_state_dict(swapped, strict=True)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(m2(x.flip(1)), m(x).flip(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_fast_path", [True, False])
def test_kernel_path_equals_portable_path(refs, use_fast_path):
    torch.manual_seed(3)
    m = BidirectionalMamba(D_MODEL, bias=True, use_fast_path=use_fast_path)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    portable = grads_of(m, x, lambda m_, x_: m_(x_))
    routes = {"mamba_inner_fn": refs.mamba_inner_ref, "selective_scan_fn": refs.selective_scan_ref,
              "causal_conv1d_fn": refs.causal_conv1d_ref}
    with route_kernels(routes):
        routed = grads_of(m, x, lambda m_, x_: m_(x_))
    assert_same(routed, portable)


def test_no_decoding():
    with pytest.raises(NotImplementedError):
        BidirectionalMamba(D_MODEL, layer_idx=0)(torch.randn(1, 3, D_MODEL), inference_params=object())
