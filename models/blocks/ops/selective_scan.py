"""Selective scan (Mamba-1): ops `selective_scan_fn` / `selective_state_update` (mamba-ssm's CUDA kernels on CUDA,
see `dispatch`) and their fast portable PyTorch twins.

The recurrence, per batch b, channel d and state n (A real, negative):

    x[t] = exp(delta[t] * A[d, n]) * x[t-1] + delta[t] * B[t, n] * u[t]        x[-1] = initial state (zeros)
    y[t] = sum_n C[t, n] * x[t, n]  (+ D[d] * u[t])  (* silu(z[t]))

How the portable path computes it: the states live time-major, as (L, ..., N) contiguous tensors, and the linear
recurrence runs as a work-efficient (Blelloch) parallel scan done in place on strided views of whole time rows:
2 * log2(L) vectorised steps, O(L) work, any L (no padding to a power of two); long sequences go through it in a
few time segments of ~12 MB of state with the state carried over (faster: cache, no page faults). Only products of
decays are formed (never a division by a cumulative decay), so decays that underflow to zero are harmless. The backward pass is a
hand-written `autograd.Function`: one reverse scan of the same kind gives dL/dx for all steps, and every input
gradient is a local product with it. Computation is in float32 (float64 stays float64); bf16/fp16 inputs are upcast
and the outputs cast back, as the CUDA kernel does. Memory: the states and the decays, two (L, B, D, N) tensors
in the compute dtype, are kept for the backward up to RECOMPUTE_BYTES; a larger scan keeps only the state entering
each time segment and its backward recomputes one segment's states at a time from it, last segment first (memory:
one segment's states, ~12 MB, instead of 2 x L rows). Time is linear in L.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .dispatch import autocast_off, compute_dtype, kernel_op

__all__ = [
    "selective_scan_fn",
    "selective_scan_portable",
    "selective_scan_tm",
    "selective_state_update",
    "selective_state_update_portable",
    "linear_scan_",
]


def _rows(t: Tensor, first: int, step: int, count: int, reverse: bool) -> Tensor:
    """Rows first, first + step, ..., of t along dim 0 (positions mirrored, t[L-1-i], when `reverse`)."""
    if reverse:
        first = t.shape[0] - 1 - (first + step * (count - 1))
    return t[first : first + step * (count - 1) + 1 : step]


def _linear_scan_clobber_(a: Tensor, x: Tensor, reverse: bool = False) -> Tensor:
    """`linear_scan_` that also overwrites `a` with partial products (no extra memory).

    Work-efficient up-sweep / down-sweep over strided views of whole rows.
    """
    length = x.shape[0]
    strides = []
    s = 1
    while 2 * s <= length:  # up-sweep: row 2s-1+2sk absorbs the segment ending at row s-1+2sk
        n = length // (2 * s)
        a_hi, x_hi = _rows(a, 2 * s - 1, 2 * s, n, reverse), _rows(x, 2 * s - 1, 2 * s, n, reverse)
        a_lo, x_lo = _rows(a, s - 1, 2 * s, n, reverse), _rows(x, s - 1, 2 * s, n, reverse)
        x_hi.addcmul_(a_hi, x_lo)
        if 4 * s <= length:  # segment products are needed only by later levels
            a_hi.mul_(a_lo)
        strides.append(s)
        s *= 2
    for s in reversed(strides):  # down-sweep: complete the rows 3s-1+2sk from the finished rows 2s-1+2sk
        if length < 3 * s:
            continue
        m = (length - 3 * s) // (2 * s) + 1
        x_tgt = _rows(x, 3 * s - 1, 2 * s, m, reverse)
        x_tgt.addcmul_(_rows(a, 3 * s - 1, 2 * s, m, reverse), _rows(x, 2 * s - 1, 2 * s, m, reverse))
    return x


# Rows of at least this many elements are scanned one row after the other (one pass over the data, the previous row
# still in cache); narrower rows by the parallel scan (2 * log2(L) vectorised steps, whose per-call overhead a row
# loop cannot amortise). Crossover measured on the CPU, one thread: ~6k elements per row.
SEQUENTIAL_ROW_ELEMENTS = 8192


def linear_scan_(a: Tensor, x: Tensor, reverse: bool = False) -> Tensor:
    """In-place first-order linear recurrence along dim 0: x[t] <- a[t] * x[t-1] + x[t] (x[-1] = 0); returns x.

    With `reverse`, x[t] <- a[t] * x[t+1] + x[t] (x[L] = 0). `a` and `x`: same shape (L, ...), contiguous; `a` is
    left unchanged (the parallel scan's temporary of L/2 rows holds the pair products). Rows of at least
    SEQUENTIAL_ROW_ELEMENTS elements go through a loop over time instead.
    """
    length = x.shape[0]
    if length < 2:
        return x
    if x[0].numel() >= SEQUENTIAL_ROW_ELEMENTS:  # wide rows: one fused multiply-add per row, a single pass
        steps = range(length - 2, -1, -1) if reverse else range(1, length)
        for t in steps:
            x[t].addcmul_(a[t], x[t + 1 if reverse else t - 1])
        return x
    n = length // 2
    first, second = _rows(x, 0, 2, n, reverse), _rows(x, 1, 2, n, reverse)
    a_first, a_second = _rows(a, 0, 2, n, reverse), _rows(a, 1, 2, n, reverse)
    second.addcmul_(a_second, first)  # pairs (2k, 2k+1) combined ...
    _linear_scan_clobber_(a_second * a_first, second, reverse)  # ... scanned at half length ...
    m = (length - 1) // 2  # ... and rows 2k, k >= 1, completed from row 2k-1.
    if m:
        _rows(x, 2, 2, m, reverse).addcmul_(_rows(a, 2, 2, m, reverse), _rows(x, 1, 2, m, reverse))
    return x


def _sum_over_h(x: Tensor, w: Tensor) -> Tensor:
    """sum_h x[..., h, n] * w[..., h]: (L, b, g, h, n), (L, b, g, h) -> (L, b, g, n)."""
    return torch.matmul(w.unsqueeze(-2), x).squeeze(-2)


def _sum_n(x: Tensor, v: Tensor, scratch: Tensor) -> Tensor:
    """sum_n x[..., h, n] * v[..., n] through a scratch buffer of x's shape (faster than bmm on the CPU)."""
    return torch.mul(x, v.unsqueeze(-2), out=scratch).sum(-1)


def _decays_(delta: Tensor, A: Tensor, out: Tensor) -> Tensor:
    """out <- exp(delta * A). The exponent is clamped where exp would leave the normal range (it is ~0 there
    anyway): CPU exp is an order of magnitude slower on arguments that underflow."""
    torch.mul(delta.unsqueeze(-1), A, out=out)
    return out.clamp_(min=-87.0 if out.dtype != torch.float64 else -708.0).exp_()


def _states(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """States x (L, b, g, h, n) of one segment from its first state h0, and the decays with one extra zero row
    (L + 1, ...): the reverse scan of the backward uses decay[t+1] at t."""
    shape = delta.shape + A.shape[-1:]  # (L, b, g, h, n)
    length = shape[0]
    decay_ext = torch.empty((length + 1,) + shape[1:], dtype=u.dtype, device=u.device)
    decay = _decays_(delta, A, decay_ext[:length])
    decay_ext[length].zero_()
    x = torch.empty(shape, dtype=u.dtype, device=u.device)
    torch.mul((delta * u).unsqueeze(-1), B.unsqueeze(-2), out=x)
    if h0 is not None:
        x[0].addcmul_(decay[0], h0)
    linear_scan_(decay, x)
    return x, decay_ext


def _grads(dy, dlast, u, delta, A, B, C, h0, x, decay_ext, clobber=False):
    """Input gradients of one segment from its states: (du, ddelta, dA, dB, dC, dh0); with `clobber`, `x` and
    `decay_ext` are overwritten (two fewer state-sized buffers)."""
    length = x.shape[0]
    decay = decay_ext[:length]
    dC = _sum_over_h(x, dy)
    # g[t] = dLoss/dx[t] = C[t] dy[t] + decay[t+1] g[t+1]
    g = torch.empty_like(x)
    torch.mul(dy.unsqueeze(-1), C.unsqueeze(-2), out=g)
    if dlast is not None:
        g[-1].add_(dlast)
    linear_scan_(decay_ext[1:], g, reverse=True)
    dh0 = None if h0 is None else decay[0] * g[0]
    dB = _sum_over_h(g, delta * u)
    # dLoss/d(delta * A)[t] = g[t] * decay[t] * x[t-1]  (x[-1] = h0), formed in place of decay[t] (t >= 1).
    dlog = decay if clobber else torch.empty_like(decay)
    torch.mul(decay[1:], x[:-1], out=dlog[1:])
    if h0 is None:
        dlog[0].zero_()
    else:
        torch.mul(decay[0], h0, out=dlog[0])
    dlog.mul_(g)
    work = x if clobber else torch.empty_like(x)
    gB = torch.mul(g, B.unsqueeze(-2), out=work).sum(-1)
    dA = torch.mul(dlog, delta.unsqueeze(-1), out=g).sum((0, 1))
    ddelta = torch.mul(dlog, A, out=g).sum(-1).addcmul_(gB, u)
    du = gB.mul_(delta)
    return du, ddelta, dA, dB, dC, dh0


class _SelectiveScanTM(torch.autograd.Function):
    """Core scan on time-major, contiguous, compute-dtype tensors, one segment (see `selective_scan_tm`).

    Saves the states x and the decays for the backward.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        x, decay_ext = _states(u, delta, A, B, h0)
        y = _sum_n(x, C, torch.empty_like(x))
        ctx.save_for_backward(u, delta, A, B, C, h0, x, decay_ext)
        return y, x[-1].clone()

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, h0, x, decay_ext = ctx.saved_tensors
        return _grads(dy.contiguous(), dlast, u, delta, A, B, C, h0, x, decay_ext)


class _SegmentedScanTM(torch.autograd.Function):
    """The same scan in time segments of `seg` rows, the state carried from one to the next, with a backward that
    recomputes: the forward keeps only its inputs and the state entering each segment; the backward re-runs each
    segment's states from that state, last segment first, and carries the state gradient backwards. Memory: one
    segment's states instead of all L rows (for about one more forward scan of work)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, seg):
        length = u.shape[0]
        y = u.new_empty(u.shape)
        firsts = []
        last = h0
        scratch = None
        for s in range(0, length, seg):
            t = slice(s, s + seg)
            firsts.append(last)
            x, _ = _states(u[t], delta[t], A, B[t], last)
            if scratch is None or scratch.shape != x.shape:
                scratch = torch.empty_like(x)
            torch.sum(torch.mul(x, C[t].unsqueeze(-2), out=scratch), -1, out=y[t])
            last = x[-1].clone()
        ctx.seg = seg
        ctx.save_for_backward(u, delta, A, B, C, *firsts)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, *firsts = ctx.saved_tensors
        seg, length = ctx.seg, u.shape[0]
        dy = dy.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA = torch.zeros_like(A)
        dstate = dlast
        starts = list(range(0, length, seg))
        for i in reversed(range(len(starts))):
            t = slice(starts[i], starts[i] + seg)
            h0 = firsts[i]
            x, decay_ext = _states(u[t], delta[t], A, B[t], h0)
            grads = _grads(dy[t], dstate, u[t], delta[t], A, B[t], C[t], h0, x, decay_ext, clobber=True)
            for out, grad in zip((du[t], ddelta[t], dB[t], dC[t]), (grads[0], grads[1], grads[3], grads[4])):
                out.copy_(grad)
            dA += grads[2]
            dstate = grads[5]
        return du, ddelta, dA, dB, dC, dstate, None


# Long sequences are scanned in time segments of about this many bytes of state each (a few, each a parallel scan,
# the state carried from one to the next): measured 2x faster at L >= 1024 on the CPU, as the working set stays in
# cache and the buffers stay below glibc's mmap threshold (so they are not page-faulted in afresh on every call).
SEGMENT_BYTES = 12 * 2**20


# A scan whose states (L rows) take more than this many bytes keeps only each segment's first state for the backward
# and recomputes the segment's states there (memory: one segment's states instead of all, for ~1.3x the scan's
# backward work); below it, every segment keeps its states (short sequences: no recomputation).
RECOMPUTE_BYTES = 64 * 2**20


def segment_length(length: int, row_bytes: int) -> int:
    """Rows per time segment: ~SEGMENT_BYTES of state, at least 16 rows, and segments of near-equal length."""
    rows = max(16, SEGMENT_BYTES // max(row_bytes, 1))
    count = -(-length // rows)
    return -(-length // count)


def _scan_grouped(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                  last: Tensor | None) -> tuple[Tensor, Tensor]:
    """The scan on grouped, contiguous compute-dtype tensors (u, delta (L, b, g, h); A (g, h, n); B, C (L, b, g, n);
    last (b, g, h, n) or None): in one piece, in segments, or in segments recomputed in the backward."""
    row_bytes = u[0].numel() * A.shape[-1] * u.element_size()
    length = u.shape[0]
    seg = segment_length(length, row_bytes)
    if seg >= length:
        return _SelectiveScanTM.apply(u, delta, A, B, C, last)
    if length * row_bytes > RECOMPUTE_BYTES:  # segments, states recomputed in the backward (see SEGMENT_BYTES)
        return _SegmentedScanTM.apply(u, delta, A, B, C, last, seg)
    ys = []  # segments, each keeping its states (no recomputation: the states are small)
    for s in range(0, length, seg):
        t = slice(s, s + seg)
        y, last = _SelectiveScanTM.apply(u[t], delta[t], A, B[t], C[t], last)
        ys.append(y)
    return torch.cat(ys), last


# Under torch.compile a scan that loops (over segments, or over every time step for wide rows) runs as it is, a graph
# break either side: traced, the loops would unroll into graphs of thousands of ops (minutes of compilation per call
# site). A scan in one parallel piece is traced and fused with its neighbours.
_scan_grouped_uncompiled = torch.compiler.disable(_scan_grouped)


def _loops(u: Tensor, n: int) -> bool:
    """Whether the scan of u (L, b, g, h) with n states per channel loops over segments or time steps."""
    length, row = u.shape[0], u[0].numel() * n
    return length > 1 and (row >= SEQUENTIAL_ROW_ELEMENTS or segment_length(length, row * u.element_size()) < length)


@autocast_off
def selective_scan_tm(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Portable scan on time-major tensors, the layout the blocks produce without transposes.

    u, delta, z: (L, B, D) (delta already biased and softplus-ed); A: (D, N); B, C: (L, B, G, N) with G dividing D
    (channel d uses group d // (D / G)); D: (D,); initial_state: (B, D, N).
    Returns y (L, B, D) in u's dtype and the final state (B, D, N) in the compute dtype (float32 or float64).
    """
    groups = B.shape[-2]
    dtype_in, cd = u.dtype, compute_dtype(u.dtype)

    def prep(t: Tensor) -> Tensor:
        return t.to(cd).contiguous()

    last = None
    if initial_state is not None:
        last = prep(rearrange(initial_state, "b (g h) n -> b g h n", g=groups))
    u_g = prep(rearrange(u, "l b (g h) -> l b g h", g=groups))
    delta_g = prep(rearrange(delta, "l b (g h) -> l b g h", g=groups))
    A_g = prep(rearrange(A, "(g h) n -> g h n", g=groups))
    scan = _scan_grouped_uncompiled if torch.compiler.is_compiling() and _loops(u_g, A.shape[-1]) else _scan_grouped
    y, last = scan(u_g, delta_g, A_g, prep(B), prep(C), last)
    y = rearrange(y, "l b g h -> l b (g h)")
    if D is not None:
        y = y + u.to(cd) * D.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(dtype_in), rearrange(last, "b g h n -> b (g h) n")


def selective_scan_portable(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    initial_state: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's `selective_scan_fn` signature and semantics, in plain PyTorch.

    u, delta, z: (B, D, L); A: (D, N) real; B, C: (B, N, L) shared or (B, G, N, L) grouped (channel d uses group
    d // (D / G)); D, delta_bias: (D,). Returns out (B, D, L) in u's dtype, and with `return_last_state` the final
    state (B, D, N) in float32 (float64 for float64 inputs). The keyword-only `initial_state` (B, D, N) is our
    extension; the CUDA kernel has none, so with it the portable path runs on every device.
    """
    if A.is_complex():
        raise NotImplementedError("the portable selective scan supports real A only")
    if B.dim() < 3 or C.dim() < 3:
        raise NotImplementedError("the portable selective scan needs input-dependent B and C: (B, N, L) or (B, G, N, L)")
    cd = compute_dtype(u.dtype)
    delta = delta.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd).unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)

    def time_major_bc(t: Tensor) -> Tensor:
        return rearrange(t, "b n l -> l b 1 n") if t.dim() == 3 else rearrange(t, "b g n l -> l b g n")

    groups = B.shape[1] if B.dim() == 4 else 1
    if C.dim() == 4 and C.shape[1] != groups or C.dim() == 3 and groups != 1:
        raise NotImplementedError("B and C must have the same number of groups")
    y, last = selective_scan_tm(
        rearrange(u, "b d l -> l b d"),
        rearrange(delta, "b d l -> l b d"),
        A,
        time_major_bc(B),
        time_major_bc(C),
        D,
        None if z is None else rearrange(z, "b d l -> l b d"),
        initial_state=initial_state,
    )
    out = rearrange(y, "l b d -> b d l")
    return (out, last) if return_last_state else out


def selective_state_update_portable(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """One recurrent step of the selective scan (mamba-ssm's `selective_state_update`), `state` updated in place.

    state: (B, D, N) or (B, H, P, N); x, dt, z: (B, D) or (B, H, P); A: (D, N) or (H, P, N); B, C: (B, N) or
    (B, G, N); D, dt_bias: (D,) or (H, P). Returns y: x's shape and dtype.
    """
    heads = state.dim() == 4
    if not heads:
        state, x, dt, A = state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0)
        B, C = B.unsqueeze(1), C.unsqueeze(1)
        D = None if D is None else D.unsqueeze(0)
        z = None if z is None else z.unsqueeze(1)
        dt_bias = None if dt_bias is None else dt_bias.unsqueeze(0)
    groups = B.shape[1]
    cd = compute_dtype(x.dtype)
    dt = dt.to(cd)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cd)
    if dt_softplus:
        dt = F.softplus(dt)
    B = rearrange(B.to(cd), "b g n -> b g 1 1 n")
    C = rearrange(C.to(cd), "b g n -> b g 1 1 n")
    dt_g = rearrange(dt, "b (g h) p -> b g h p 1", g=groups)
    x_g = rearrange(x.to(cd), "b (g h) p -> b g h p 1", g=groups)
    decay = torch.exp(dt_g * rearrange(A.to(cd), "(g h) p n -> g h p n", g=groups))
    new = rearrange(state.to(cd), "b (g h) p n -> b g h p n", g=groups) * decay + dt_g * B * x_g
    state.copy_(rearrange(new, "b g h p n -> b (g h) p n"))
    out = rearrange((new * C).sum(-1), "b g h p -> b (g h) p")
    if D is not None:
        out = out + x.to(cd) * D.to(cd)
    if z is not None:
        out = out * F.silu(z.to(cd))
    out = out.to(x.dtype)
    return out if heads else out.squeeze(1)


selective_scan_fn = kernel_op("selective_scan_fn", selective_scan_portable, positional=5,
                              portable_only=("initial_state",))
selective_state_update = kernel_op("selective_state_update", selective_state_update_portable, positional=6)
