"""RMSNorm modules (with the fused residual add of pre-norm blocks) and the gated, grouped RMSNorm of Mamba-2.

State dicts equal mamba-ssm's `ops.triton.layer_norm.RMSNorm` and `ops.triton.layernorm_gated.RMSNorm` (one `weight`).
How they are computed (Triton kernel or portable twin) is in `ops/rms_norm.py`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .ops.rms_norm import gated_rms_norm, rms_norm

__all__ = ["RMSNorm", "RMSNormGated"]


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
