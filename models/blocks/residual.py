"""Pre-norm residual block around a sequence mixer, with mamba-ssm's `Block` forward contract."""
from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from .norm import RMSNorm


class Block(nn.Module):
    """residual <- residual + drop_path(hidden_states); hidden_states <- mixer(norm(residual)).

    forward(hidden_states (B, L, dim), residual (B, L, dim) or None, inference_params=None) -> (hidden_states,
    residual). For the first block pass residual=None (then residual = hidden_states, no drop path). With RMSNorm the
    add and the norm run fused (`rms_norm`'s prenorm mode); `residual_in_fp32` keeps the residual stream in float32.
    State_dict keys: norm.*, mixer.*.
    """

    def __init__(self, dim: int, mixer_cls: Callable[[int], nn.Module], norm_cls: Callable[[int], nn.Module] = RMSNorm,
                 residual_in_fp32: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None, inference_params=None,
                **mixer_kwargs) -> tuple[Tensor, Tensor]:
        if residual is not None:
            hidden_states = self.drop_path(hidden_states)
        if isinstance(self.norm, RMSNorm):
            hidden_states, residual = self.norm(hidden_states, residual=residual, prenorm=True,
                                                residual_in_fp32=self.residual_in_fp32)
        else:
            residual = hidden_states + residual if residual is not None else hidden_states
            hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
            if self.residual_in_fp32:
                residual = residual.to(torch.float32)
        if inference_params is not None:
            mixer_kwargs["inference_params"] = inference_params
        return self.mixer(hidden_states, **mixer_kwargs), residual

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
