"""VMamba's 2D selective scan (SS2D, four cross-scan directions) and the VSS block, VMamba v0 layout.

SS2D on a channels-last map (B, H, W, C): in_proj to x and z (d_inner = expand * C each); x goes through a depthwise
3x3 conv + SiLU, then is read as four sequences of L = H*W tokens: row-major, column-major, and both reversed. One
selective scan runs all four at once (4 * d_inner channels, B/C grouped per direction, as VMamba calls the kernel);
the four outputs are mapped back to the grid and summed, normalised (LayerNorm), gated by silu(z), and projected.

Parameters and shapes equal VMamba v0's (`vssmsmall_dp03_ckpt_epoch_238.pth`), with K = 4 directions, D = d_inner,
r = dt_rank, N = d_state: in_proj [2D, C] (no bias), conv2d [D, 1, k, k] + bias, x_proj_weight [K, r + 2N, D],
dt_projs_weight [K, D, r], dt_projs_bias [K, D], A_logs [K*D, N], Ds [K*D], out_norm [D], out_proj [C, D].
`vmamba_key_map` renames VMamba checkpoints (v0 `ln_1`/`self_attention`, newer `norm`/`op`) to this module's keys.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath
from torch import Tensor, nn

from .mamba import init_dt_proj, ones_d, s4d_real_a_log
from .ops.dispatch import compute_dtype, use_kernels
from .ops.selective_scan import selective_scan_fn, selective_scan_tm

K = 4  # scan directions: row-major, column-major, row-major reversed, column-major reversed


def cross_scan(x: Tensor) -> Tensor:
    """(B, H, W, D) -> (L, B, K, D) time-major sequences, L = H*W, in the order of K."""
    rows = rearrange(x, "b h w d -> (h w) b d")
    cols = rearrange(x, "b h w d -> (w h) b d")
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)], dim=2)


def cross_merge(y: Tensor, h: int, w: int) -> Tensor:
    """(L, B, K, D) -> (B, H, W, D): each direction's outputs put back on the grid, then summed."""
    rows = y[:, :, 0] + y[:, :, 2].flip(0)
    cols = y[:, :, 1] + y[:, :, 3].flip(0)
    return rearrange(rows, "(h w) b d -> b h w d", h=h) + rearrange(cols, "(w h) b d -> b h w d", h=h, w=w)


class SS2D(nn.Module):
    """VMamba 2D selective scan: (B, H, W, d_model) -> (B, H, W, d_model), channels last.

    d_state N states per channel, expand (d_inner = expand * d_model), a depthwise d_conv x d_conv conv,
    dt_rank = ceil(d_model / 16) by default. The dt initialisation and the dt/A/D parameters follow VMamba v0
    (Mamba's rules, once per direction).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, dropout: float = 0.0, conv_bias: bool = True, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        self.conv2d = nn.Conv2d(self.d_inner, self.d_inner, d_conv, padding=(d_conv - 1) // 2, groups=self.d_inner,
                                bias=conv_bias, **fk)
        self.act = nn.SiLU()
        # One Linear per direction, drawn in VMamba's order, then stacked into single tensors.
        x_projs = [nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk) for _ in range(K)]
        self.x_proj_weight = nn.Parameter(torch.stack([p.weight for p in x_projs]))
        dt_projs = []
        for _ in range(K):
            p = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
            init_dt_proj(p, self.dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
            dt_projs.append(p)
        self.dt_projs_weight = nn.Parameter(torch.stack([p.weight for p in dt_projs]))
        self.dt_projs_bias = nn.Parameter(torch.stack([p.bias for p in dt_projs]))
        self.A_logs = s4d_real_a_log(K * self.d_inner, d_state, device)
        self.Ds = ones_d(K * self.d_inner, device)
        self.out_norm = nn.LayerNorm(self.d_inner, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, W, d_model) -> (B, H, W, d_model)."""
        _, h, w, _ = x.shape
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = self.act(self.conv2d(rearrange(xs, "b h w d -> b d h w")))
        xs = cross_scan(rearrange(xs, "b d h w -> b h w d"))  # (L, B, K, D)
        y = self.scan(xs)  # (L, B, K, D)
        y = self.out_norm(cross_merge(y, h, w).to(x.dtype))
        return self.dropout(self.out_proj(y * F.silu(z)))

    def scan(self, xs: Tensor) -> Tensor:
        """The four directions in one selective scan: xs (L, B, K, D) -> y (L, B, K, D), float32 (float64 stays)."""
        x_dbl = torch.einsum("lbkd,kcd->lbkc", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dts = torch.einsum("lbkr,kdr->lbkd", dts, self.dt_projs_weight)
        cd = compute_dtype(xs.dtype)
        As = -torch.exp(self.A_logs.float())
        if use_kernels(xs):  # mamba-ssm's layout: (B, K*D, L) and grouped B/C (B, K, N, L)
            y = selective_scan_fn(
                rearrange(xs, "l b k d -> b (k d) l").contiguous().float(),
                rearrange(dts, "l b k d -> b (k d) l").contiguous().float(),
                As, rearrange(Bs, "l b k n -> b k n l").contiguous().float(),
                rearrange(Cs, "l b k n -> b k n l").contiguous().float(), self.Ds.float(),
                delta_bias=self.dt_projs_bias.float().flatten(), delta_softplus=True,
            )
            return rearrange(y, "b (k d) l -> l b k d", k=K).to(cd)
        delta = F.softplus(dts.to(cd) + self.dt_projs_bias.to(cd))
        y, _ = selective_scan_tm(rearrange(xs, "l b k d -> l b (k d)"), rearrange(delta, "l b k d -> l b (k d)"),
                                 As, Bs, Cs, self.Ds)
        return rearrange(y, "l b (k d) -> l b k d", k=K).to(cd)


class VSSBlock(nn.Module):
    """VMamba's VSS block, channels last: x (B, H, W, C) -> x + drop_path(SS2D(LayerNorm(x))), and with
    mlp_ratio > 0 (newer VMamba) a second pre-norm residual MLP branch. Keys: norm.*, mixer.* (+ norm2.*, mlp.*)."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, norm_eps: float = 1e-6, attn_drop_rate: float = 0.0,
                 d_state: int = 16, mlp_ratio: float = 0.0, **ss2d_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, eps=norm_eps)
        self.mixer = SS2D(hidden_dim, d_state=d_state, dropout=attn_drop_rate, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = None
        if mlp_ratio > 0:
            hidden = int(hidden_dim * mlp_ratio)
            self.norm2 = nn.LayerNorm(hidden_dim, eps=norm_eps)
            self.mlp = nn.Sequential()
            self.mlp.add_module("fc1", nn.Linear(hidden_dim, hidden))
            self.mlp.add_module("act", nn.GELU())
            self.mlp.add_module("fc2", nn.Linear(hidden, hidden_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mixer(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


# (pattern, replacement) applied in order to every key: one dotted name segment at a time, so that `out_norm`,
# `patch_embed.norm`, a stage's final `norm` and `downsample.norm` are never touched.
VMAMBA_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)ln_1\.", r"\1norm."),  # v0 block norm
    (r"(^|\.)self_attention\.", r"\1mixer."),  # v0 SS2D
    (r"(^|\.)op\.", r"\1mixer."),  # newer VMamba SS2D (its block norm is already called `norm`)
)


def vmamba_key_map(state_dict: dict[str, Tensor], rules=VMAMBA_KEY_RULES) -> dict[str, Tensor]:
    """Rename a VMamba state_dict (v0: `...blocks.j.ln_1.*`, `...self_attention.*`; newer: `...norm.*`, `...op.*`)
    to our VSSBlock keys (`norm.*`, `mixer.*`). Tensors and their shapes are unchanged. Apply it to a checkpoint's
    `model` (or `model_ema`) entry."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


__all__ = ["SS2D", "VSSBlock", "vmamba_key_map", "VMAMBA_KEY_RULES", "cross_scan", "cross_merge"]
