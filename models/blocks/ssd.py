"""SSD, the chunked state-space-duality scan of Mamba-2: portable PyTorch, kernel dispatch, and a decoding step.

Recurrence per head h (state S_t of shape (P, N), one step per token t):

    dt_t = softplus(dt_t + dt_bias)  (optional, then clamped to dt_limit)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t  = S_t C_t + D * x_t,  then  y_t *= silu(z_t)  when z is given

The portable scan splits the sequence into equal chunks of at most `chunk_size` tokens: inside a chunk the outputs
are a masked, decay-weighted attention-like product, across chunks the states are passed by one small matrix product
over the chunk boundaries. Inside a chunk the decay exp(Acs_i - Acs_j) is factorised as exp(Acs_i - m) exp(m - Acs_j)
around the chunk's centre m whenever that cannot overflow, which needs one (q, q) matrix per group instead of one per
head (far fewer elementwise passes); chunks that decay too much take the per-head matrix. Everything is batched tensor
algebra (no Python loop over time or chunks), autograd gives the backward pass, any length works (padded
internally), and float32 / float64 / bfloat16 are supported (bfloat16 is computed in float32).

Public entry points mirror mamba-ssm: `mamba_chunk_scan_combined`, `mamba_split_conv1d_scan_combined`, and
`ssd_state_update` (selective_state_update for Mamba-2's per-head scalar A). On CUDA with the kernels available they
call mamba-ssm; elsewhere the portable functions of the same name with a `_portable` suffix.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from .conv import causal_conv1d_portable
from .kernels import get_kernel, use_kernels
from .norm import gated_rms_norm_portable

NO_LIMIT = (0.0, float("inf"))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float],
                cdt: torch.dtype) -> Tensor:
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _chunk_len(seqlen: int, chunk_size: int) -> int:
    # Chunking changes nothing mathematically, so spread the tokens evenly over the fewest chunks of at most
    # chunk_size: L=197, chunk 64 -> 4 chunks of 50 (3 pad tokens) instead of 4 x 64 (59 pad tokens).
    nchunks = max(1, math.ceil(seqlen / chunk_size))
    return math.ceil(seqlen / nchunks)


# exp() of arguments below these gives subnormals or zero, which CPUs compute 10-30x slower than normal results.
# Log-decays are <= 0 and such tiny weights (< 1e-34 / 1e-304) vanish next to anything they are summed with.
_EXP_FLOOR = {torch.float64: -700.0}
# Largest |log-decay - chunk centre| for which the intra-chunk decay is factorised (exp(+-range) stays normal).
_FACTOR_RANGE = {torch.float64: 600.0}


def _decay(log_decay: Tensor, keep: Tensor | None = None) -> Tensor:
    """exp of log-decays, floored (see _EXP_FLOOR). Entries outside the boolean mask `keep` (e.g. the acausal half
    of a segment-sum matrix, which may hold large positive values) give exp(0) = 1, never inf: the caller zeroes
    them with a masked factor."""
    t = log_decay.clamp(min=_EXP_FLOOR.get(log_decay.dtype, -80.0))
    return torch.exp(t if keep is None else t.masked_fill(~keep, 0.0))


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                initial_states: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The bare chunked scan, all tensors in one floating dtype; dt already discretised (positive).

    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n) with h % g == 0; initial_states: (b, h, p, n).
    Returns y (b, l, h, p) without the D skip and gate, and the final state (b, h, p, n).
    """
    b, seqlen, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = _chunk_len(seqlen, chunk_size)
    pad = (-seqlen) % q
    xdt = x * dt[..., None]
    if pad:
        # Padded steps have dt = 0: no input and no decay, so the final state is untouched.
        xdt, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xdt, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    xc = rearrange(xdt, "b (c q) (g r) p -> b c g q r p", q=q, g=g)
    Bc = rearrange(B, "b (c q) g n -> b c g q n", q=q)
    Cc = rearrange(C, "b (c q) g n -> b c g q n", q=q)
    Acs = torch.cumsum(rearrange(dt, "b (c q) h -> b c h q", q=q) * A[:, None], dim=-1)  # log-decay since chunk start

    # 1. Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(Acs_i - Acs_j) dt_j x_j
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    CB = torch.matmul(Cc, Bc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (b, c, g, q, q)
    # Centre of each chunk's log-decays; the result does not depend on it, hence detached.
    mid = ((Acs.amax(dim=-1, keepdim=True) + Acs.amin(dim=-1, keepdim=True)) / 2).detach()  # (b, c, h, 1)
    if (Acs - mid).abs().max().item() <= _FACTOR_RANGE.get(Acs.dtype, 60.0):
        # exp(Acs_i - Acs_j) = exp(Acs_i - mid) exp(mid - Acs_j): one (q, q) @ (q, r*p) product per group, no
        # (q, q) matrix per head. Safe from overflow while every factor stays within exp(+-range).
        to_heads = "b c (g r) q -> b c g q r 1"
        u = (xc * rearrange(torch.exp(mid - Acs), to_heads, g=g)).flatten(-2)  # (b, c, g, q, (r p))
        y = rearrange(torch.matmul(CB, u), "b c g q (r p) -> b c g q r p", r=r)
        y = y * rearrange(torch.exp(Acs - mid), to_heads, g=g)
    else:
        # Large decay inside a chunk: the per-head decay matrix exp(segsum) (acausal entries -> 1, times CB = 0).
        L = rearrange(_decay(Acs[..., :, None] - Acs[..., None, :], causal), "b c (g r) i j -> b c g r i j", g=g)
        y = torch.matmul(L * CB[:, :, :, None], rearrange(xc, "b c g q r p -> b c g r q p")).transpose(3, 4)

    # 2. State each chunk leaves at its end: sum_j exp(Acs_end - Acs_j) dt_j x_j B_j^T
    w = rearrange(_decay(Acs[..., -1:] - Acs), "b c (g r) q -> b c g q r 1", g=g)
    states = torch.matmul((xc * w).flatten(-2).transpose(-1, -2), Bc)  # (b, c, g, (r p), n)

    # 3. Pass states across chunk boundaries. With cs_z = sum of the chunk log-decays before chunk z, the state at
    #    the start of chunk z (z = 0..c; z = c is the final state) is
    #    sum_{k<z} exp(cs_z - cs_{k+1}) states_k + exp(cs_z) initial_state.
    states = rearrange(states, "b c g (r p) n -> b (g r) c (p n)", r=r)
    cs = F.pad(torch.cumsum(rearrange(Acs[..., -1], "b c h -> b h c"), dim=-1), (1, 0))  # (b, h, c+1)
    nc = cs.shape[-1]
    earlier = torch.ones(nc, nc - 1, dtype=torch.bool, device=x.device).tril(diagonal=-1)
    decay = _decay(cs[..., :, None] - cs[..., None, 1:], earlier) * earlier  # (b, h, c+1, c)
    # start-of-chunk states and the final state as two products (slicing one output costs a zero-fill in backward)
    start, final = torch.matmul(decay[:, :, :-1], states), torch.matmul(decay[:, :, -1:], states)
    if initial_states is not None:
        init = rearrange(initial_states.to(states.dtype), "b h p n -> b h 1 (p n)")
        cs_decay = _decay(cs)[..., None]
        start, final = start + cs_decay[:, :, :-1] * init, final + cs_decay[:, :, -1:] * init
    final = rearrange(final, "b h 1 (p n) -> b h p n", n=n)
    start = rearrange(start, "b (g r) c (p n) -> b c g n (r p)", g=g, n=n)

    # 4. Contribution of the start-of-chunk state: exp(Acs_i) C_i . S_start
    y_off = rearrange(torch.matmul(Cc, start), "b c g q (r p) -> b c g q r p", r=r)
    y_off = y_off * rearrange(_decay(Acs), "b c (g r) q -> b c g q r 1", g=g)
    y = rearrange(y + y_off, "b c g q r p -> b (c q) (g r) p")
    return y[:, :seqlen], final


def _skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        Dh = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Dh[:, None] if Dh.dim() == 1 else Dh)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def mamba_chunk_scan_combined_portable(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
    z: Tensor | None = None, dt_bias: Tensor | None = None, initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None, cu_seqlens: Tensor | None = None, dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT, return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Portable SSD scan with mamba-ssm's `mamba_chunk_scan_combined` signature (seq_idx / varlen unsupported).

    x: (b, l, h, p); dt: (b, l, h); A: (h,) (negative); B, C: (b, l, g, n); D: (h,) or (h, p); z: (b, l, h, p);
    dt_bias: (h,); initial_states: (b, h, p, n). Returns y (b, l, h, p) in x's dtype and, with
    `return_final_states`, the final state (b, h, p, n) in float32 (float64 for float64 inputs).
    """
    if seq_idx is not None or return_varlen_states:
        raise NotImplementedError("seq_idx / varlen states need mamba-ssm's CUDA kernels")
    cdt = _compute_dtype(x.dtype)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    y, final = ssd_chunked(x.to(cdt), dt, A.to(cdt), B.to(cdt), C.to(cdt), chunk_size, initial_states)
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    return (y, final) if return_final_states else y


def mamba_chunk_scan_combined(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
    z: Tensor | None = None, dt_bias: Tensor | None = None, initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None, cu_seqlens: Tensor | None = None, dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT, return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """SSD scan: mamba-ssm's Triton kernel on CUDA, else `mamba_chunk_scan_combined_portable` (same shapes)."""
    if use_kernels(x):
        kwargs = {}
        if tuple(dt_limit) != NO_LIMIT:
            kwargs["dt_limit"] = dt_limit
        for key, val in (("initial_states", initial_states), ("seq_idx", seq_idx), ("cu_seqlens", cu_seqlens)):
            if val is not None:
                kwargs[key] = val
        if return_final_states:
            kwargs["return_final_states"] = True
        if return_varlen_states:
            kwargs["return_varlen_states"] = True
        return get_kernel("mamba_chunk_scan_combined")(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, **kwargs
        )
    return mamba_chunk_scan_combined_portable(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
        cu_seqlens=cu_seqlens, dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states,
        return_varlen_states=return_varlen_states,
    )


def _split_sizes(zxbcdt: Tensor, conv1d_weight: Tensor, D: Tensor, headdim: int | None, ngroups: int):
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim is required when D is 1-D")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    if d_nonssm < 0:
        raise ValueError(f"zxbcdt has {zxbcdt.shape[-1]} channels, too few for dim={dim}, dstate={dstate}")
    return nheads, headdim, dim, dstate, d_nonssm


def mamba_split_conv1d_scan_combined_portable(
    zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
    chunk_size: int, initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
    dt_limit: tuple[float, float] = NO_LIMIT, return_final_states: bool = False, activation: str | None = "silu",
    rmsnorm_weight: Tensor | None = None, rmsnorm_eps: float = 1e-6, outproj_weight: Tensor | None = None,
    outproj_bias: Tensor | None = None, headdim: int | None = None, ngroups: int = 1,
    norm_before_gate: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Portable twin of mamba-ssm's fused Mamba-2 layer body `mamba_split_conv1d_scan_combined`.

    zxbcdt: (b, l, 2*d_nonssm + 2*dim + 2*ngroups*n + h), the in_proj output ordered [z0, x0, z, xBC, dt];
    conv1d_weight: (dim + 2*ngroups*n, W). Computes conv + SiLU on xBC, the SSD scan (dt softplus'ed with dt_bias),
    the gated RMSNorm when `rmsnorm_weight` is given (else the plain silu(z) gate), prepends silu(z0) * x0 when
    d_nonssm > 0, and applies the out projection when given. Returns (b, l, out_dim) [, final state (b, h, p, n)].
    """
    if seq_idx is not None:
        raise NotImplementedError("seq_idx needs mamba-ssm's CUDA kernels")
    nheads, headdim, dim, dstate, d_nonssm = _split_sizes(zxbcdt, conv1d_weight, D, headdim, ngroups)
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_portable(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation=activation)
    x, B, C = torch.split(xBC.transpose(1, 2), [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    res = mamba_chunk_scan_combined_portable(
        rearrange(x, "b l (h p) -> b l h p", p=headdim), dt, A,
        rearrange(B, "b l (g n) -> b l g n", g=ngroups), rearrange(C, "b l (g n) -> b l g n", g=ngroups),
        chunk_size, D=D, z=rearrange(z, "b l (h p) -> b l h p", p=headdim) if rmsnorm_weight is None else None,
        dt_bias=dt_bias, initial_states=initial_states, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states,
    )
    y, final = res if return_final_states else (res, None)
    y = rearrange(y, "b l h p -> b l (h p)")
    if rmsnorm_weight is not None:
        y = gated_rms_norm_portable(y, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                                    norm_before_gate=norm_before_gate)
    if d_nonssm > 0:
        z0, x0 = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


def mamba_split_conv1d_scan_combined(
    zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
    chunk_size: int, initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
    dt_limit: tuple[float, float] = NO_LIMIT, return_final_states: bool = False, activation: str | None = "silu",
    rmsnorm_weight: Tensor | None = None, rmsnorm_eps: float = 1e-6, outproj_weight: Tensor | None = None,
    outproj_bias: Tensor | None = None, headdim: int | None = None, ngroups: int = 1,
    norm_before_gate: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused Mamba-2 layer body: mamba-ssm's kernel on CUDA, else the portable twin (same arguments and shapes)."""
    if use_kernels(zxbcdt):
        kwargs = {}
        if tuple(dt_limit) != NO_LIMIT:
            kwargs["dt_limit"] = dt_limit
        if initial_states is not None:
            kwargs["initial_states"] = initial_states
        if seq_idx is not None:
            kwargs["seq_idx"] = seq_idx
        if return_final_states:
            kwargs["return_final_states"] = True
        return get_kernel("mamba_split_conv1d_scan_combined")(
            zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, activation=activation,
            rmsnorm_weight=rmsnorm_weight, rmsnorm_eps=rmsnorm_eps, outproj_weight=outproj_weight,
            outproj_bias=outproj_bias, headdim=headdim, ngroups=ngroups, norm_before_gate=norm_before_gate, **kwargs,
        )
    return mamba_split_conv1d_scan_combined_portable(
        zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=initial_states,
        dt_limit=dt_limit, return_final_states=return_final_states, activation=activation,
        rmsnorm_weight=rmsnorm_weight, rmsnorm_eps=rmsnorm_eps, outproj_weight=outproj_weight,
        outproj_bias=outproj_bias, headdim=headdim, ngroups=ngroups, norm_before_gate=norm_before_gate,
    )


def ssd_state_update_portable(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
) -> Tensor:
    """One recurrent step of the SSD scan, updating `state` in place.

    state: (b, h, p, n); x: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n); D: (h,) or (h, p); z: (b, h, p);
    dt_bias: (h,). Returns y (b, h, p) in x's dtype.
    """
    cdt = _compute_dtype(x.dtype)
    h, g = x.shape[1], B.shape[1]
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)  # (b, h)
    decay = torch.exp(dt * A.to(cdt))
    Bh = repeat(B.to(cdt), "b g n -> b (g r) 1 n", r=h // g)
    Ch = repeat(C.to(cdt), "b g n -> b (g r) n 1", r=h // g)
    xs = x.to(cdt)
    new = state.to(cdt) * decay[..., None, None] + (dt[..., None] * xs)[..., None] * Bh
    state.copy_(new)
    y = torch.matmul(new, Ch).squeeze(-1)
    return _skip_and_gate(y, xs, D, z).to(x.dtype)


def ssd_state_update(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
) -> Tensor:
    """Decoding step (shapes in `ssd_state_update_portable`): mamba-ssm's `selective_state_update` on CUDA."""
    if not use_kernels(x):
        return ssd_state_update_portable(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    p, n = x.shape[-1], state.shape[-1]
    if tuple(dt_limit) != NO_LIMIT:
        # The kernel has no dt_limit: discretise here and hand it a zero bias and no softplus.
        dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32).to(x.dtype)
        dt_bias, dt_softplus = torch.zeros_like(A), False
    if dt_bias is None:
        dt_bias = torch.zeros_like(A)
    # Mamba-2 ties A, dt, dt_bias (and usually D) over the head dimension: expanded views with stride 0.
    return get_kernel("selective_state_update")(
        state, x, repeat(dt, "b h -> b h p", p=p), repeat(A.float(), "h -> h p n", p=p, n=n), B, C,
        D=None if D is None else (repeat(D, "h -> h p", p=p) if D.dim() == 1 else D), z=z,
        dt_bias=repeat(dt_bias, "h -> h p", p=p), dt_softplus=dt_softplus,
    )
