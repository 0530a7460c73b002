"""SS2D / VSSBlock against an independent VMamba-v0 reference (four explicit scans with mamba-ssm's
selective_scan_ref), the kernel code path, and the VMamba checkpoint key map."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.blocks.ops.dispatch import route_kernels
from models.blocks.ss2d import SS2D, VSSBlock, vmamba_key_map

C, BATCH, H, W = 16, 2, 5, 7


def vmamba_v0_reference(m: SS2D, x: torch.Tensor, selective_scan_ref) -> torch.Tensor:
    """VMamba v0's SS2D forward, channels first, one reference scan per direction."""
    b, h, w, _ = x.shape
    length, d = h * w, m.d_inner
    xz = m.in_proj(x)
    xs, z = xz.chunk(2, dim=-1)
    xs = F.silu(m.conv2d(xs.permute(0, 3, 1, 2)))  # (b, d, h, w)
    row = xs.reshape(b, d, length)
    col = xs.transpose(2, 3).reshape(b, d, length)
    seqs = [row, col, row.flip(-1), col.flip(-1)]
    ys = []
    for k, seq in enumerate(seqs):
        x_dbl = torch.einsum("bdl,cd->bcl", seq, m.x_proj_weight[k])
        dt, Bk, Ck = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=1)
        dt = torch.einsum("brl,dr->bdl", dt, m.dt_projs_weight[k])
        sl = slice(k * d, (k + 1) * d)
        ys.append(selective_scan_ref(seq, dt, -torch.exp(m.A_logs[sl].float()), Bk, Ck, m.Ds[sl].float(),
                                     delta_bias=m.dt_projs_bias[k].float(), delta_softplus=True))
    y_row = ys[0] + ys[2].flip(-1)
    y_col = ys[1] + ys[3].flip(-1)
    y = y_row.reshape(b, d, h, w) + y_col.reshape(b, d, w, h).transpose(2, 3)
    y = m.out_norm(y.permute(0, 2, 3, 1))
    return m.out_proj(y * F.silu(z))


def outputs_and_grads(module, x, fn):
    x = x.detach().clone().requires_grad_()
    out = fn(module, x)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    grads["input"] = x.grad
    module.zero_grad()
    return out.detach(), grads


def assert_same(a, b, tol=1e-4):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def test_parameter_shapes_are_vmamba_v0():
    m = SS2D(96)
    d, r = 192, math.ceil(96 / 16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * d, 96), "conv2d.weight": (d, 1, 3, 3), "conv2d.bias": (d,),
        "x_proj_weight": (4, r + 32, d), "dt_projs_weight": (4, d, r), "dt_projs_bias": (4, d),
        "A_logs": (4 * d, 16), "Ds": (4 * d,), "out_norm.weight": (d,), "out_norm.bias": (d,),
        "out_proj.weight": (96, d),
    }
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    torch.testing.assert_close(m.A_logs[5].exp(), torch.arange(1, 17.0))


@pytest.mark.parametrize("hw,seg", [((H, W), None), ((1, 1), None), ((3, 3), None), ((H, W), 8), ((H, W), 16)])
def test_matches_vmamba_v0_reference(mamba_ref, monkeypatch, hw, seg):
    """seg: force time segments of that many rows with the recomputing backward (what a 56x56 map gets at batch 4;
    8 and 16 do not divide L = 35)."""
    if seg is not None:
        from models.blocks.ops import selective_scan as scan

        monkeypatch.setattr(scan, "segment_length", lambda length, row_bytes: seg)
        monkeypatch.setattr(scan, "RECOMPUTE_BYTES", 0)
    torch.manual_seed(0)
    m = SS2D(C)
    with torch.no_grad():  # move off the init so that every path matters
        m.dt_projs_bias.add_(torch.randn_like(m.dt_projs_bias))
        m.A_logs.add_(0.3 * torch.randn_like(m.A_logs))
        m.Ds.add_(torch.randn_like(m.Ds))
    x = torch.randn(BATCH, *hw, C)
    ours = outputs_and_grads(m, x, lambda m_, x_: m_(x_))
    ref = outputs_and_grads(m, x, lambda m_, x_: vmamba_v0_reference(m_, x_, mamba_ref.selective_scan_ref))
    assert_same(ours, ref)


def test_kernel_path_equals_portable_path(mamba_ref):
    """Routing to mamba-ssm's reference scan: one call with 4*D channels and grouped B/C, same results."""
    torch.manual_seed(1)
    m = SS2D(C)
    x = torch.randn(BATCH, H, W, C)
    calls = []

    def spy(u, delta, A, B, C_, *args, **kwargs):
        calls.append((u.shape, B.shape))
        return mamba_ref.selective_scan_ref(u, delta, A, B, C_, *args, **kwargs)

    portable = outputs_and_grads(m, x, lambda m_, x_: m_(x_))
    with route_kernels({"selective_scan_fn": spy}):
        routed = outputs_and_grads(m, x, lambda m_, x_: m_(x_))
    assert calls == [((BATCH, 4 * m.d_inner, H * W), (BATCH, 4, m.d_state, H * W))]
    assert_same(routed, portable)


def test_vss_block_residual_and_drop_path():
    torch.manual_seed(2)
    blk = VSSBlock(C, drop_path=0.5).eval()
    x = torch.randn(BATCH, H, W, C)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), x + blk.mixer(blk.norm(x)))
    assert blk.norm.eps == 1e-6
    blk.train()
    blk(x).sum().backward()  # drop path active in training


def synthetic_vmamba_block(prefix: str, new_names: bool, dim: int = C) -> dict[str, torch.Tensor]:
    """One VMamba block's tensors with the released checkpoints' names and shapes."""
    d, r, n = 2 * dim, math.ceil(dim / 16), 16
    norm, op = ("norm", "op") if new_names else ("ln_1", "self_attention")
    g = torch.Generator().manual_seed(3)
    shapes = {
        f"{norm}.weight": (dim,), f"{norm}.bias": (dim,),
        f"{op}.in_proj.weight": (2 * d, dim), f"{op}.conv2d.weight": (d, 1, 3, 3), f"{op}.conv2d.bias": (d,),
        f"{op}.x_proj_weight": (4, r + 2 * n, d), f"{op}.dt_projs_weight": (4, d, r), f"{op}.dt_projs_bias": (4, d),
        f"{op}.A_logs": (4 * d, n), f"{op}.Ds": (4 * d,), f"{op}.out_norm.weight": (d,), f"{op}.out_norm.bias": (d,),
        f"{op}.out_proj.weight": (dim, d),
    }
    return {prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("new_names", [False, True])
def test_vmamba_key_map_loads_strict(new_names):
    prefix = "layers.2.blocks.13."
    others = {"patch_embed.norm.weight": torch.ones(96), "layers.0.downsample.norm.weight": torch.ones(384),
              "norm.weight": torch.ones(768), "head.weight": torch.zeros(1000, 768)}
    sd = {**synthetic_vmamba_block(prefix, new_names), **others}
    mapped = vmamba_key_map(sd)
    for k in others:  # names outside the blocks are untouched
        assert mapped[k] is sd[k]
    block_sd = {k[len(prefix):]: v for k, v in mapped.items() if k.startswith(prefix)}
    blk = VSSBlock(C)
    blk.load_state_dict(block_sd, strict=True)
    old = "op" if new_names else "self_attention"
    torch.testing.assert_close(blk.mixer.x_proj_weight, sd[f"{prefix}{old}.x_proj_weight"])
    torch.testing.assert_close(blk.norm.weight, sd[f"{prefix}{'norm' if new_names else 'ln_1'}.weight"])
    torch.testing.assert_close(blk.mixer.out_norm.bias, sd[f"{prefix}{old}.out_norm.bias"])
