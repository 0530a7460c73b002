"""RMSNorm (with the fused residual add of pre-norm blocks) and the gated, grouped RMSNorm of Mamba-2.

State dicts equal mamba-ssm's `ops.triton.layer_norm.RMSNorm` and `ops.triton.layernorm_gated.RMSNorm` (one `weight`).
On CUDA with mamba-ssm available the Triton kernels run; elsewhere the portable functions below, which compute in
float32 (float64 stays float64) and return the input dtype, as the kernels do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .kernels import get_kernel, use_kernels


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last axis, optionally fused with the residual add of a pre-norm block (mamba-ssm `rms_norm_fn`).

    s = dropout(x) + residual (residual optional); out = s / sqrt(mean(s^2) + eps) * weight (+ bias), in x's dtype.
    With `prenorm` also returns s, stored in residual's dtype, else float32 if `residual_in_fp32`, else x's dtype.
    """
    if use_kernels(x):
        return get_kernel("rms_norm_fn")(
            x, weight, bias, residual=residual, eps=eps, dropout_p=dropout_p, prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
        )
    return rms_norm_portable(x, weight, bias, residual, eps, dropout_p, prenorm, residual_in_fp32)


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
    """Portable `rms_norm` (plain PyTorch)."""
    out_dtype = x.dtype
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    cdt = _compute_dtype(out_dtype)
    s = x.to(cdt)
    if dropout_p > 0.0:
        s = F.dropout(s, p=dropout_p)
    if residual is not None:
        s = s + residual.to(cdt)
    out = s * torch.rsqrt(s.square().mean(dim=-1, keepdim=True) + eps) * weight.to(cdt)
    if bias is not None:
        out = out + bias.to(cdt)
    out = out.to(out_dtype)
    return (out, s.to(res_dtype)) if prenorm else out


class RMSNorm(nn.Module):
    """RMSNorm over the last axis of (..., D) with a learned gain `weight` (D,), initialised to ones.

    forward(x, residual=None, prenorm=False, residual_in_fp32=False): see `rms_norm`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, dropout_p: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.drop = nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, residual: Tensor | None = None, prenorm: bool = False,
                residual_in_fp32: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        p = self.drop.p if self.drop is not None and self.training else 0.0
        return rms_norm(x, self.weight, self.bias, residual=residual, eps=self.eps, dropout_p=p, prenorm=prenorm,
                        residual_in_fp32=residual_in_fp32)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def gated_rms_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    z: Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> Tensor:
    """Grouped RMSNorm with a SiLU gate (mamba-ssm `layernorm_gated.rmsnorm_fn`). x, z: (..., D); weight: (D,).

    norm_before_gate: norm(x) * silu(z); else norm(x * silu(z)). Groups of `group_size` channels are normalised
    separately (None: one group). Returns x's dtype.
    """
    if use_kernels(x):
        return get_kernel("rmsnorm_fn")(x, weight, bias, z=z, eps=eps, group_size=group_size,
                                        norm_before_gate=norm_before_gate)
    return gated_rms_norm_portable(x, weight, bias, z, eps, group_size, norm_before_gate)


def gated_rms_norm_portable(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    z: Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> Tensor:
    """Portable `gated_rms_norm` (plain PyTorch)."""
    cdt = _compute_dtype(x.dtype)
    h = x.to(cdt)
    gate = F.silu(z.to(cdt)) if z is not None else None
    if gate is not None and not norm_before_gate:
        h = h * gate
    if group_size is None or group_size == h.shape[-1]:
        h = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)
    else:
        hg = rearrange(h, "... (g d) -> ... g d", d=group_size)
        h = rearrange(hg * torch.rsqrt(hg.square().mean(dim=-1, keepdim=True) + eps), "... g d -> ... (g d)")
    h = h * weight.to(cdt)
    if bias is not None:
        h = h + bias.to(cdt)
    if gate is not None and norm_before_gate:
        h = h * gate
    return h.to(x.dtype)


class RMSNormGated(nn.Module):
    """Gated grouped RMSNorm of Mamba-2: x, z (..., D) -> (..., D); `weight` (D,) initialised to ones.

    Same constructor and state_dict as mamba-ssm's `layernorm_gated.RMSNorm`; see `gated_rms_norm`.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return gated_rms_norm(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                              norm_before_gate=self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
