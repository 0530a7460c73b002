"""RMSNorm ops: plain (with the fused residual add of pre-norm blocks) and gated, grouped (Mamba-2).

Ops `rms_norm` (mamba-ssm's `ops.triton.layer_norm.rms_norm_fn`) and `gated_rms_norm`
(`ops.triton.layernorm_gated.rmsnorm_fn`): the Triton kernels on CUDA, elsewhere the portable twins here, which
compute in float32 (float64 stays float64) and return the input dtype, as the kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .dispatch import compute_dtype, kernel_op


def rms_norm_portable(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last axis, optionally fused with the residual add of a pre-norm block.

    s = dropout(x) + residual (residual optional); out = s / sqrt(mean(s^2) + eps) * weight (+ bias), in x's dtype.
    With `prenorm` also returns s, stored in residual's dtype, else float32 if `residual_in_fp32`, else x's dtype.
    """
    out_dtype = x.dtype
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    cdt = compute_dtype(out_dtype)
    s = x.to(cdt)
    if dropout_p > 0.0:
        s = F.dropout(s, p=dropout_p)
    if residual is not None:
        s = s + residual.to(cdt)
    out = F.rms_norm(s, s.shape[-1:], weight.to(cdt), eps)
    if bias is not None:
        out = out + bias.to(cdt)
    out = out.to(out_dtype)
    return (out, s.to(res_dtype)) if prenorm else out


def gated_rms_norm_portable(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    z: Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> Tensor:
    """Grouped RMSNorm with a SiLU gate. x, z: (..., D); weight: (D,).

    norm_before_gate: norm(x) * silu(z); else norm(x * silu(z)). Groups of `group_size` channels are normalised
    separately (None: one group). Returns x's dtype.
    """
    cdt = compute_dtype(x.dtype)
    h = x.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        h = h * gate
    if group_size is None or group_size == h.shape[-1]:
        h = F.rms_norm(h, h.shape[-1:], weight.to(cdt), eps)
    else:
        hg = rearrange(h, "... (g d) -> ... g d", d=group_size)
        h = rearrange(F.rms_norm(hg, (group_size,), None, eps), "... g d -> ... (g d)") * weight.to(cdt)
    if bias is not None:
        h = h + bias.to(cdt)
    if gate is not None and norm_before_gate:
        h = h * gate
    return h.to(x.dtype)


rms_norm = kernel_op("rms_norm_fn", rms_norm_portable, positional=3, name="rms_norm")
gated_rms_norm = kernel_op("rmsnorm_fn", gated_rms_norm_portable, positional=3, name="gated_rms_norm")
