"""Causal depthwise 1-D convolution (the short conv in front of every Mamba scan) and its one-step update.

Ops `causal_conv1d_fn` / `causal_conv1d_update` with causal-conv1d's signatures: its CUDA kernels on CUDA (see
`dispatch`), elsewhere the portable twins here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import kernel_op

_ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation: str | None) -> bool:
    if activation not in _ACTIVATIONS:
        raise NotImplementedError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return activation is not None


def causal_conv1d_portable(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: Tensor | None = None,
    activation: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Portable causal depthwise conv: out[:, d, t] = sum_k weight[d, k] * x[:, d, t - (W-1) + k] (+ bias).

    x: (B, D, L); weight: (D, W); bias: (D,); initial_states: (B, D, W-1), the inputs before t = 0 (zeros if None).
    Returns out (B, D, L) in x's dtype, and with `return_final_states` also the last W-1 inputs (B, D, W-1), written
    into `final_states_out` when given. `seq_idx` (packed sequences) needs the CUDA kernel.
    """
    if seq_idx is not None:
        raise NotImplementedError("seq_idx needs the causal-conv1d CUDA kernel")
    silu = _check_activation(activation)
    dim, width = weight.shape
    # A depthwise conv2d over (B, D, 1, L) in x's memory order: x usually is a transposed view of a (B, L, D)
    # projection, which oneDNN reads as channels-last; its output's transpose is contiguous again. This was the
    # fastest CPU route measured (vs conv1d, shifted multiply-adds, unfold; benchmarks/RESULTS.md). Without initial
    # states the causal left padding is the conv's own (both sides, the right overhang dropped): no padded copy.
    seqlen = x.shape[-1]
    xw = x.to(weight.dtype)
    w4 = weight[:, None, None, :]
    if initial_states is None:
        out = F.conv2d(xw.unsqueeze(2), w4, bias, padding=(0, width - 1), groups=dim).squeeze(2)[..., :seqlen]
    else:
        xp = torch.cat([initial_states.to(weight.dtype), xw], dim=-1)
        out = F.conv2d(xp.unsqueeze(2), w4, bias, groups=dim).squeeze(2)
    if silu:
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    tail = xw[..., max(seqlen - (width - 1), 0):]
    if initial_states is not None:
        tail = xp[..., xp.shape[-1] - (width - 1):]
    elif seqlen < width - 1:
        tail = F.pad(tail, (width - 1 - seqlen, 0))
    final = tail.to(x.dtype)
    if final_states_out is not None:
        final = final_states_out.copy_(final)
    return out, final


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


causal_conv1d_fn = kernel_op("causal_conv1d_fn", causal_conv1d_portable, positional=3)
causal_conv1d_update = kernel_op("causal_conv1d_update", causal_conv1d_update_portable, positional=3)
