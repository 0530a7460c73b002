"""SSD, the chunked state-space-duality scan of Mamba-2: ops (mamba-ssm's Triton kernels on CUDA, see `dispatch`),
their portable PyTorch twins, and a decoding step.

Recurrence per head h (state S_t of shape (P, N), one step per token t):

    dt_t = softplus(dt_t + dt_bias)  (optional, then clamped to dt_limit)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T
    y_t  = S_t C_t + D * x_t,  then  y_t *= silu(z_t)  when z is given

The portable scan splits the sequence into equal chunks of a length it picks itself (`portable_chunk_len`; the
`chunk_size` argument is the kernels'): inside a chunk the outputs are a masked, decay-weighted attention-like
product (the decays factored per token when a chunk decays by less than FACTOR_SPAN, else one (q, q) decay matrix
per head), across chunks the states are passed by one small matrix product over the chunk boundaries. Everything is
batched tensor algebra (no Python loop over time or chunks; one host synchronisation, the decay check), autograd
gives the backward pass, any length works (padded
internally), and float32 / float64 / bfloat16 are supported (bfloat16 is computed in float32).

Public entry points mirror mamba-ssm: `mamba_chunk_scan_combined`, `mamba_split_conv1d_scan_combined`, and
`ssd_state_update` (selective_state_update for Mamba-2's per-head scalar A). On CUDA with the kernels available they
call mamba-ssm; elsewhere the portable functions of the same name with a `_portable` suffix.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from .causal_conv import causal_conv1d_portable
from .dispatch import compute_dtype, kernel_op
from .rms_norm import gated_rms_norm_portable

NO_LIMIT = (0.0, float("inf"))


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


# The portable scan's own chunk length (outputs do not depend on it in exact arithmetic; the `chunk_size` argument
# is the kernels' and the checkpoints'): per device type, (longest sequence run as one chunk, chunk length for longer
# ones). One chunk needs no state passing at all; beyond that the (q, q) work per chunk grows with q while the state
# passing costs the same per token, so short chunks win. Measured on the CPU (benchmarks/RESULTS.md, issue 20).
PORTABLE_CHUNKS: dict[str, tuple[int, int]] = {"cpu": (256, 96)}
DEFAULT_PORTABLE_CHUNKS = (256, 96)


def portable_chunk_len(seqlen: int, device: torch.device) -> int:
    """The chunk length the portable scan uses for `seqlen` tokens on `device` (see PORTABLE_CHUNKS): the whole
    sequence when it is short, else the tokens spread evenly over the fewest chunks of at most the table's length
    (L=300, 96 -> 4 chunks of 75, no padding, rather than 4 x 96)."""
    single, chunk = PORTABLE_CHUNKS.get(device.type, DEFAULT_PORTABLE_CHUNKS)
    if seqlen <= single:
        return max(seqlen, 1)
    return math.ceil(seqlen / math.ceil(seqlen / chunk))


# exp() of arguments below these gives subnormals or zero, which CPUs compute 10-30x slower than normal results.
# Log-decays are <= 0 and such tiny weights (< 1e-34 / 1e-304) vanish next to anything they are summed with.
_EXP_FLOOR = {torch.float64: -700.0}


def _floor(dtype: torch.dtype) -> float:
    return _EXP_FLOOR.get(dtype, -80.0)


@functools.lru_cache(maxsize=64)
def _acausal(rows: int, cols: int, diagonal: int, device: torch.device) -> Tensor:
    """Boolean mask (rows, cols), true above the `diagonal`-th diagonal (the entries a causal product drops),
    made once per shape and device (a normal tensor even when first asked for under inference mode)."""
    with torch.inference_mode(False):
        return torch.ones(rows, cols, dtype=torch.bool, device=device).triu(diagonal + 1)


# Largest log-decay over one chunk for which the intra-chunk product is factored (see ssd_chunked): its factors stay
# within exp(+-FACTOR_SPAN / 2) (1e17 in float32, far from overflow with any sane input scale).
FACTOR_SPAN = {torch.float64: 600.0, torch.float32: 80.0}


def _host_min(t: Tensor) -> float | None:
    """min(t) read from host memory for a CPU tensor; None on a device, where reading it would stall the device (the
    callers then take the path that needs no value: a GPU runs mamba-ssm's kernels anyway), and under torch.compile,
    where a value read from a tensor splits the graph."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return float(t.detach().min().numpy())


def _factorable(Acs: Tensor) -> bool:
    """Whether every chunk's total log-decay (Acs[..., -1], <= 0) is within FACTOR_SPAN (CPU tensors only)."""
    span, low = FACTOR_SPAN.get(Acs.dtype, 0.0), _host_min(Acs[..., -1])
    return span > 0 and low is not None and low >= -span


MIN_FACTOR_CHUNK = 16


def factored_chunk_len(dA: Tensor, chunk_len: int) -> int:
    """The chunk length the portable scan runs at: `chunk_len`, else the longest of the lengths that spread the
    tokens evenly over 2x, 4x, ... as many chunks (down to MIN_FACTOR_CHUNK) whose every chunk decays by at most
    FACTOR_SPAN, so that ssd_chunked factors its decays; `chunk_len` again when none does (strong decay: the
    per-head decay matrices). dA: (b, l, h) per-token log-decays dt * A (<= 0)."""
    span = FACTOR_SPAN.get(dA.dtype, 0.0) if dA.device.type == "cpu" and not torch.compiler.is_compiling() else 0.0
    b, seqlen, h = dA.shape
    q, dA = chunk_len, dA.detach()
    while span > 0:
        sums = F.pad(dA, (0, 0, 0, (-seqlen) % q)).view(b, -1, q, h).sum(2)
        if _host_min(sums) >= -span:
            return q
        nc = 2 * math.ceil(seqlen / q)
        if nc > seqlen or math.ceil(seqlen / nc) < MIN_FACTOR_CHUNK:
            break
        q = math.ceil(seqlen / nc)
    return chunk_len


def _decay(log_decay: Tensor) -> Tensor:
    """exp of log-decays (<= 0), floored (see _EXP_FLOOR)."""
    return torch.exp(log_decay.clamp(min=_floor(log_decay.dtype)))


class _CausalDecayMatrix(torch.autograd.Function):
    """M[b, c, g, r, i, j] = exp(Acs[b, c, h, i] - Acs[b, c, h, j]) * CB[b, c, g, i, j], head h = (g, r).

    Acs: (b, c, h, q) log-decays since the chunk start (non-increasing in q); CB: (b, c, g, q, q), causally masked.
    The exponent is clamped to [floor, 0] (the acausal half, multiplied by 0, stays finite). Hand-written backward:
    d/dexponent = dM * M (zero where clamped: there CB = 0, or M ~ exp(floor)), so autograd's chain of clamp masks,
    broadcast subtraction and products over the (q, q) matrices becomes two products and three reductions.
    """

    @staticmethod
    def forward(ctx, Acs: Tensor, CB: Tensor, groups: int) -> Tensor:
        b, c, h, q = Acs.shape
        E = (Acs[..., :, None] - Acs[..., None, :]).clamp_(min=_floor(Acs.dtype), max=0.0).exp_()
        E = E.view(b, c, groups, h // groups, q, q)
        M = E * CB[:, :, :, None]
        ctx.save_for_backward(E, CB, M)
        return M

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dM: Tensor):
        E, CB, M = ctx.saved_tensors
        b, c, g, r, q, _ = M.shape
        dAcs = dCB = None
        if ctx.needs_input_grad[0]:
            dseg = (dM * M).view(b, c, g * r, q, q)
            dAcs = dseg.sum(-1) - dseg.sum(-2)
        if ctx.needs_input_grad[1]:
            dCB = (dM * E).sum(3)
        return dAcs, dCB, None


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_len: int,
                initial_states: Tensor | None = None, return_final: bool = True) -> tuple[Tensor, Tensor | None]:
    """The bare chunked scan, all tensors in one floating dtype; dt already discretised (positive), A negative.

    x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n) with h % g == 0; initial_states: (b, h, p, n);
    chunks of `chunk_len` tokens (the last one padded). Returns y (b, l, h, p) without the D skip and gate (possibly
    a strided view), and the final state (b, h, p, n) (None when not `return_final`).
    """
    b, seqlen, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = chunk_len
    pad = (-seqlen) % q
    xdt = x * dt[..., None]
    if pad:
        # Padded steps have dt = 0: no input and no decay, so the final state is untouched.
        xdt, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xdt, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    Bc = rearrange(B, "b (c q) g n -> b c g q n", q=q)
    Cc = rearrange(C, "b (c q) g n -> b c g q n", q=q)
    Acs = torch.cumsum(rearrange(dt, "b (c q) h -> b c h q", q=q) * A[:, None], dim=-1)  # log-decay since chunk start
    nc = Acs.shape[1]

    # 1. Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(Acs_i - Acs_j) dt_j x_j.
    #    The causal mask goes on C.B (per group). When no chunk decays by more than FACTOR_SPAN (checked on the
    #    host), exp(Acs_i - Acs_j) = exp(Acs_i - m) exp(m - Acs_j) with m half the chunk's log-decay (every factor
    #    within exp(+-FACTOR_SPAN / 2)): y = exp(Acs - m) * (CB @ (exp(m - Acs) * xdt)), one product per group
    #    over all its heads and no (q, q) work per head. Otherwise one (q, q) decay matrix per head.
    CB = torch.matmul(Cc, Bc.transpose(-1, -2)).masked_fill_(_acausal(q, q, 0, x.device), 0.0)  # (b, c, g, q, q)
    if _factorable(Acs):
        rel = Acs - 0.5 * Acs[..., -1:].detach()  # m cancels in exact arithmetic: no gradient through it
        xs = rearrange(xdt, "b (c q) (g r) p -> b c g q r p", q=q, g=g)
        xs = xs * rearrange(torch.exp(-rel), "b c (g r) q -> b c g q r 1", g=g)
        y = rearrange(torch.matmul(CB, xs.flatten(-2)), "b c g q (r p) -> b (c q) (g r) p", r=r)
        y = y * rearrange(torch.exp(rel), "b c h q -> b (c q) h 1")
    else:
        M = _CausalDecayMatrix.apply(Acs, CB, g)  # (b, c, g, r, q, q)
        y = torch.matmul(M, rearrange(xdt, "b (c q) (g r) p -> b c g r q p", q=q, g=g))  # (b, c, g, r, q, p)
        y = rearrange(y, "b c g r q p -> b (c q) (g r) p")
    if nc == 1 and initial_states is None and not return_final:
        return y[:, :seqlen], None

    # 2. State each chunk leaves at its end: sum_j exp(Acs_end - Acs_j) dt_j x_j B_j^T
    xc = rearrange(xdt, "b (c q) (g r) p -> b c g q r p", q=q, g=g)
    w = rearrange(_decay(Acs[..., -1:] - Acs), "b c (g r) q -> b c g q r 1", g=g)
    states = torch.matmul((xc * w).flatten(-2).transpose(-1, -2), Bc)  # (b, c, g, (r p), n)

    # 3. Pass states across chunk boundaries. With cs_z = sum of the chunk log-decays before chunk z, the state at
    #    the start of chunk z (z = 0..c; z = c is the final state) is
    #    sum_{k<z} exp(cs_z - cs_{k+1}) states_k + exp(cs_z) initial_state.
    states = rearrange(states, "b c g (r p) n -> b (g r) c (p n)", r=r)
    cs = F.pad(torch.cumsum(rearrange(Acs[..., -1], "b c h -> b h c"), dim=-1), (1, 0))  # (b, h, c+1)
    decay = _decay((cs[..., :, None] - cs[..., None, 1:]).clamp(max=0.0))
    decay = decay.masked_fill(_acausal(nc + 1, nc, -1, x.device), 0.0)  # (b, h, c+1, c)
    # start-of-chunk states and the final state as two products (slicing one output costs a zero-fill in backward)
    start, final = torch.matmul(decay[:, :, :-1], states), torch.matmul(decay[:, :, -1:], states)
    if initial_states is not None:
        init = rearrange(initial_states.to(states.dtype), "b h p n -> b h 1 (p n)")
        cs_decay = _decay(cs)[..., None]
        start, final = start + cs_decay[:, :, :-1] * init, final + cs_decay[:, :, -1:] * init
    final = rearrange(final, "b h 1 (p n) -> b h p n", n=n)

    # 4. Contribution of the start-of-chunk state: exp(Acs_i) C_i . S_start (nothing enters chunk 0 without an
    #    initial state).
    if nc > 1 or initial_states is not None:
        start = rearrange(start, "b (g r) c (p n) -> b c g n (r p)", g=g, n=n)
        y_off = rearrange(torch.matmul(Cc, start), "b c g q (r p) -> b (c q) (g r) p", r=r)
        y = y + y_off * rearrange(_decay(Acs), "b c h q -> b (c q) h 1")
    return y[:, :seqlen], final if return_final else None


def _skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        Dh = D.to(y.dtype)
        y = torch.addcmul(y, x.to(y.dtype), Dh[:, None] if Dh.dim() == 1 else Dh)
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
    """SSD scan with mamba-ssm's `mamba_chunk_scan_combined` signature (seq_idx / varlen need the kernel).

    x: (b, l, h, p); dt: (b, l, h); A: (h,) (negative); B, C: (b, l, g, n); D: (h,) or (h, p); z: (b, l, h, p);
    dt_bias: (h,); initial_states: (b, h, p, n). Returns y (b, l, h, p) in x's dtype and, with
    `return_final_states`, the final state (b, h, p, n) in float32 (float64 for float64 inputs).
    """
    if seq_idx is not None or return_varlen_states:
        raise NotImplementedError("seq_idx / varlen states need mamba-ssm's CUDA kernels")
    cdt = compute_dtype(x.dtype)
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, cdt)
    A = A.to(cdt)
    q = factored_chunk_len(dt * A, portable_chunk_len(x.shape[1], x.device))
    y, final = ssd_chunked(x.to(cdt), dt, A, B.to(cdt), C.to(cdt), q, initial_states,
                           return_final=return_final_states)
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    return (y, final) if return_final_states else y


def split_zxbcdt(zxbcdt: Tensor, d_ssm: int, ngroups: int, d_state: int, nheads: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Mamba-2's in_proj output (..., 2*d_mlp + 2*d_ssm + 2*ngroups*d_state + nheads), ordered [z0, x0, z, xBC, dt],
    split into z0, x0 (..., d_mlp) (the optional gated-MLP part), z (..., d_ssm), xBC (..., d_ssm + 2*ngroups*d_state)
    and dt (..., nheads). Views, no copies."""
    d_xbc = d_ssm + 2 * ngroups * d_state
    d_mlp = (zxbcdt.shape[-1] - d_ssm - d_xbc - nheads) // 2
    if d_mlp < 0:
        raise ValueError(f"zxbcdt has {zxbcdt.shape[-1]} channels, too few for d_ssm={d_ssm}, d_state={d_state}")
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, d_ssm, d_xbc, nheads], dim=-1)
    return z0, x0, z, xBC, dt


def gate_mlp(y: Tensor, z0: Tensor, x0: Tensor) -> Tensor:
    """silu(z0) * x0 prepended to y on the last axis (nothing to prepend when the gated-MLP part is empty)."""
    return torch.cat([F.silu(z0) * x0, y], dim=-1) if z0.shape[-1] > 0 else y


def mamba_split_conv1d_scan_combined_portable(
    zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, dt_bias: Tensor, A: Tensor, D: Tensor,
    chunk_size: int, initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
    dt_limit: tuple[float, float] = NO_LIMIT, return_final_states: bool = False, activation: str | None = "silu",
    rmsnorm_weight: Tensor | None = None, rmsnorm_eps: float = 1e-6, outproj_weight: Tensor | None = None,
    outproj_bias: Tensor | None = None, headdim: int | None = None, ngroups: int = 1,
    norm_before_gate: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fused Mamba-2 layer body with mamba-ssm's `mamba_split_conv1d_scan_combined` signature.

    zxbcdt: (b, l, 2*d_nonssm + 2*dim + 2*ngroups*n + h), the in_proj output ordered [z0, x0, z, xBC, dt];
    conv1d_weight: (dim + 2*ngroups*n, W). Computes conv + SiLU on xBC, the SSD scan (dt softplus'ed with dt_bias),
    the gated RMSNorm when `rmsnorm_weight` is given (else the plain silu(z) gate), prepends silu(z0) * x0 when
    d_nonssm > 0, and applies the out projection when given. Returns (b, l, out_dim) [, final state (b, h, p, n)].
    """
    if seq_idx is not None:
        raise NotImplementedError("seq_idx needs mamba-ssm's CUDA kernels")
    if D.dim() == 1 and headdim is None:
        raise ValueError("headdim is required when D is 1-D")
    nheads, headdim = (D.shape[0], headdim) if D.dim() == 1 else D.shape
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    z0, x0, z, xBC, dt = split_zxbcdt(zxbcdt, dim, ngroups, dstate, nheads)
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
    y = gate_mlp(y, z0, x0)
    if outproj_weight is not None:
        # In zxbcdt's dtype (the autocast dtype under autocast), as the kernel does.
        y = F.linear(y, outproj_weight.to(y.dtype), None if outproj_bias is None else outproj_bias.to(y.dtype))
    return (y, final) if return_final_states else y


def ssd_state_update_portable(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
    dt_limit: tuple[float, float] = NO_LIMIT,
) -> Tensor:
    """One recurrent step of the SSD scan, updating `state` in place (on CUDA: mamba-ssm's `selective_state_update`).

    state: (b, h, p, n); x: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n); D: (h,) or (h, p); z: (b, h, p);
    dt_bias: (h,). Returns y (b, h, p) in x's dtype.
    """
    cdt = compute_dtype(x.dtype)
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


def _state_update_kernel(kernel, state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                        D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                        dt_softplus: bool = False, dt_limit: tuple[float, float] = NO_LIMIT) -> Tensor:
    """`ssd_state_update`'s arguments for mamba-ssm's `selective_state_update` (per-channel A, dt, D, no dt_limit)."""
    p, n = x.shape[-1], state.shape[-1]
    if tuple(dt_limit) != NO_LIMIT:
        # The kernel has no dt_limit: discretise here and hand it a zero bias and no softplus.
        dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32).to(x.dtype)
        dt_bias, dt_softplus = torch.zeros_like(A), False
    if dt_bias is None:
        dt_bias = torch.zeros_like(A)
    # Mamba-2 ties A, dt, dt_bias (and usually D) over the head dimension: expanded views with stride 0.
    return kernel(
        state, x, repeat(dt, "b h -> b h p", p=p), repeat(A.float(), "h -> h p n", p=p, n=n), B, C,
        D=None if D is None else (repeat(D, "h -> h p", p=p) if D.dim() == 1 else D), z=z,
        dt_bias=repeat(dt_bias, "h -> h p", p=p), dt_softplus=dt_softplus,
    )


mamba_chunk_scan_combined = kernel_op("mamba_chunk_scan_combined", mamba_chunk_scan_combined_portable, positional=6)
mamba_split_conv1d_scan_combined = kernel_op("mamba_split_conv1d_scan_combined",
                                             mamba_split_conv1d_scan_combined_portable, positional=7)
ssd_state_update = kernel_op("selective_state_update", ssd_state_update_portable, positional=6,
                             to_kernel=_state_update_kernel, name="ssd_state_update")
