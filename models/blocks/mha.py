"""Multi-head self-attention with mamba-ssm's `MHA` parameters (as DeMansia 2 uses it): qkv in_proj, an optional
causal depthwise conv over q/k/v, partial rotary embedding, SDPA, out_proj.

Parameter names and shapes equal `mamba_ssm.modules.mha.MHA` (without its MLP and grouped-KV options):
`in_proj` (3 * heads * head_dim, d_model) (+ bias), `conv1d` (3 * heads * head_dim, 1, d_conv) (+ bias) when
d_conv > 0, `out_proj` (d_model, heads * head_dim) (+ bias). The rotary embedding has no parameters and no buffers (its
tables are computed per call), so state_dicts load both ways with strict=True.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def rotary_tables(seqlen: int, dim: int, base: float, device, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of position * inv_freq, each (seqlen, dim / 2), computed in float32 then cast to `dtype`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate the first 2 * cos.shape[-1] channels of x (B, L, H, D) by position; the rest pass through.

    Non-interleaved (GPT-NeoX style): channel i pairs with channel i + rotary_dim / 2. Interleaved: 2i with 2i + 1.
    """
    rd = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    cos, sin = rearrange(cos, "l d -> l 1 d"), rearrange(sin, "l d -> l 1 d")
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = rearrange(torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1), "... d two -> ... (d two)")
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated, x_pass], dim=-1)


class MHA(nn.Module):
    """Self-attention: (B, L, embed_dim) -> (B, L, embed_dim).

    Args:
        embed_dim: model width.
        num_heads: attention heads.
        head_dim: per-head width (default embed_dim / num_heads; DeMansia 2 uses 96 with 3 or 6 heads).
        qkv_proj_bias, out_proj_bias: biases of the two projections.
        softmax_scale: default 1 / sqrt(head_dim).
        causal: causal mask (DeMansia 2: False).
        d_conv: width of the causal depthwise conv over the q/k/v channels (0 = none); no activation after it.
        rotary_emb_dim: channels of each head that get rotary position embedding (0 = none), positions 0..L-1.
        rotary_emb_base, rotary_emb_interleaved: rotary frequency base and channel pairing.
        layer_idx: kept for mamba-ssm compatibility (unused: no recurrent decoding here).
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int | None = None, qkv_proj_bias: bool = True,
                 out_proj_bias: bool = True, softmax_scale: float | None = None, causal: bool = False, d_conv: int = 0,
                 rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False,
                 layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
            head_dim = embed_dim // num_heads
        if rotary_emb_dim % 2 or rotary_emb_dim > head_dim:
            raise ValueError(f"rotary_emb_dim={rotary_emb_dim} must be even and at most head_dim={head_dim}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.softmax_scale, self.causal, self.d_conv, self.layer_idx = softmax_scale, causal, d_conv, layer_idx
        self.rotary_emb_dim, self.rotary_emb_base = rotary_emb_dim, rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved
        qkv_dim = 3 * num_heads * head_dim
        self.in_proj = nn.Linear(embed_dim, qkv_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(qkv_dim, qkv_dim, kernel_size=d_conv, padding=d_conv - 1, groups=qkv_dim, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=out_proj_bias, **factory)

    def forward(self, x: Tensor, inference_params=None) -> Tensor:
        if inference_params is not None:
            raise NotImplementedError("MHA here has no KV cache (DeMansia 2 attends over the whole image at once)")
        seqlen = x.shape[1]
        qkv = self.in_proj(x)
        if self.d_conv > 0:
            # Left padding d_conv - 1, drop the right overhang: output t sees inputs t - d_conv + 1 .. t.
            qkv = rearrange(self.conv1d(rearrange(qkv, "b l d -> b d l"))[..., :seqlen], "b d l -> b l d")
        q, k, v = rearrange(qkv, "b l (three h d) -> three b l h d", three=3, d=self.head_dim).unbind(0)
        if self.rotary_emb_dim > 0:
            cos, sin = rotary_tables(seqlen, self.rotary_emb_dim, self.rotary_emb_base, x.device, q.dtype)
            q = apply_rotary(q, cos, sin, self.rotary_emb_interleaved)
            k = apply_rotary(k, cos, sin, self.rotary_emb_interleaved)
        q, k, v = (rearrange(t, "b l h d -> b h l d") for t in (q, k, v))
        context = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.softmax_scale)
        return self.out_proj(rearrange(context, "b h l d -> b l (h d)"))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim}, d_conv={self.d_conv}, "
                f"rotary_emb_dim={self.rotary_emb_dim}, causal={self.causal}")
