"""Causal depthwise 1-D convolution (the short conv in front of every Mamba scan) and its one-step update.

Signatures follow causal-conv1d's `causal_conv1d_fn` / `causal_conv1d_update`; on CUDA with the kernels available
(see `kernels.use_kernels`) the calls go to causal-conv1d, elsewhere to the portable PyTorch code here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import get_kernel, use_kernels

_ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation: str | None) -> bool:
    if activation not in _ACTIVATIONS:
        raise NotImplementedError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return activation is not None


def causal_conv1d_portable(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Portable causal depthwise conv: out[:, d, t] = sum_k weight[d, k] * x[:, d, t - (W-1) + k] (+ bias).

    x: (B, D, L); weight: (D, W); bias: (D,); initial_states: (B, D, W-1), the inputs before t = 0 (zeros if None).
    Returns out (B, D, L) in x's dtype, and with `return_final_states` also the last W-1 inputs (B, D, W-1).
    """
    silu = _check_activation(activation)
    dim, width = weight.shape
    # Work in (B, L, D) memory order: x usually is a transposed view of a (B, L, D) projection, and a channels-last
    # depthwise conv2d returns (B, D, L) whose transpose is contiguous again, so neither pass nor backward copies.
    xt = x.transpose(1, 2).to(weight.dtype)
    if initial_states is None:
        xp = F.pad(xt, (0, 0, width - 1, 0))
    else:
        xp = torch.cat([initial_states.transpose(1, 2).to(weight.dtype), xt], dim=1)
    out = F.conv2d(xp.transpose(1, 2).unsqueeze(2), weight[:, None, None, :], bias, groups=dim).squeeze(2)
    if silu:
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    return out, xp[:, xp.shape[1] - (width - 1):].transpose(1, 2).to(x.dtype)


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: Tensor | None = None,
    activation: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal depthwise conv with causal-conv1d's signature; x: (B, D, L), weight: (D, W) -> (B, D, L).

    Only the CUDA kernel supports `seq_idx` (packed variable-length sequences).
    """
    if use_kernels(x):
        kwargs = {}
        if seq_idx is not None:
            kwargs["seq_idx"] = seq_idx
        if initial_states is not None:
            kwargs["initial_states"] = initial_states
        if return_final_states:
            kwargs.update(return_final_states=True, final_states_out=final_states_out)
        return get_kernel("causal_conv1d_fn")(x, weight, bias, activation=activation, **kwargs)
    if seq_idx is not None:
        raise NotImplementedError("seq_idx needs the causal-conv1d CUDA kernel")
    res = causal_conv1d_portable(x, weight, bias, initial_states, return_final_states, activation)
    if return_final_states and final_states_out is not None:
        final_states_out.copy_(res[1])
        res = (res[0], final_states_out)
    return res


def causal_conv1d_update_portable(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Portable decoding step. x: (B, D) or (B, D, L) new inputs; conv_state: (B, D, S), S >= W-1, the last S inputs,
    updated in place (shifted left, new inputs appended). Returns the conv outputs for the new inputs, x's shape."""
    silu = _check_activation(activation)
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    dim, width = weight.shape
    seqlen, state_len = x.shape[-1], conv_state.shape[-1]
    window = torch.cat([conv_state.to(weight.dtype), x.to(weight.dtype)], dim=-1)
    conv_state.copy_(window[..., window.shape[-1] - state_len:])
    out = F.conv1d(window[..., window.shape[-1] - (seqlen + width - 1):], weight.unsqueeze(1), bias, groups=dim)
    if silu:
        out = F.silu(out)
    out = out.to(x.dtype)
    return out.squeeze(-1) if squeeze else out


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Decoding step with causal-conv1d's signature (see `causal_conv1d_update_portable` for shapes)."""
    if use_kernels(x):
        return get_kernel("causal_conv1d_update")(x, conv_state, weight, bias, activation)
    return causal_conv1d_update_portable(x, conv_state, weight, bias, activation)
