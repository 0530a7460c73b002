"""Mamba (Mamba-1) mixer: the same constructor, parameters, initialisation and state_dict as mamba-ssm's
`mamba_ssm.modules.mamba_simple.Mamba`, running mamba-ssm's fused kernels on CUDA and the portable scan elsewhere."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .ops.causal_conv import causal_conv1d_fn, causal_conv1d_update
from .ops.dispatch import compute_dtype, get_kernel, use_kernels
from .ops.selective_scan import selective_scan_fn, selective_scan_tm, selective_state_update
from .recurrent import RecurrentCache


class Branch(NamedTuple):
    """The parameters of one scan direction (conv, projections, decay, skip)."""

    conv1d: nn.Conv1d
    x_proj: nn.Linear
    dt_proj: nn.Linear
    A_log: Tensor
    D: Tensor


def init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float, dt_max: float, dt_init: str, dt_scale: float,
                 dt_init_floor: float) -> None:
    """mamba-ssm's dt initialisation: weight uniform (or constant) at dt_rank**-0.5 * dt_scale; bias such that
    softplus(bias) is log-uniform in [dt_min, dt_max] (floored at dt_init_floor)."""
    std = dt_scale / math.sqrt(dt_rank)
    if dt_init == "random":
        nn.init.uniform_(dt_proj.weight, -std, std)
    elif dt_init == "constant":
        nn.init.constant_(dt_proj.weight, std)
    else:
        raise NotImplementedError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
    w = dt_proj.weight
    with torch.no_grad():
        dt_proj.bias.copy_(dt_bias_init(dt_proj.out_features, dt_min, dt_max, dt_init_floor, w.device, w.dtype))
    dt_proj.bias._no_reinit = True


def dt_bias_init(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None, dtype=None) -> Tensor:
    """mamba-ssm's dt bias (n,): dt log-uniform in [dt_min, dt_max] (floored at dt_init_floor), stored as
    softplus^-1(dt) = dt + log(1 - exp(-dt)) so that softplus(bias) = dt. Shared by Mamba (dt_proj.bias) and Mamba-2
    (dt_bias)."""
    u = torch.rand(n, device=device, dtype=dtype)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def s4d_real_a_log(d_inner: int, d_state: int, device=None) -> nn.Parameter:
    """A_log (d_inner, d_state) in float32 with A = -exp(A_log) = -[1, 2, ..., d_state] for every channel."""
    a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).expand(d_inner, d_state)
    p = nn.Parameter(torch.log(a).contiguous())
    p._no_weight_decay = True
    return p


def ones_d(d_inner: int, device=None) -> nn.Parameter:
    """The skip D (d_inner,), float32, initialised to ones."""
    p = nn.Parameter(torch.ones(d_inner, device=device))
    p._no_weight_decay = True
    return p


class Mamba(RecurrentCache, nn.Module):
    """Mamba-1 selective-state-space mixer.

    Input and output (B, L, d_model). Internally d_inner = expand * d_model channels, a causal depthwise conv of width
    d_conv, and a selective scan with d_state states per channel. Arguments, parameter names/shapes and the
    initialisation (including the order random numbers are drawn) equal mamba-ssm's `Mamba`, so state_dicts move
    between the two with strict=True. `use_fast_path` selects mamba-ssm's fused `mamba_inner_fn` when its kernels
    run (CUDA); without kernels the portable path runs: ops.causal_conv1d_fn + ops.selective_scan_tm.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **fk)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        init_dt_proj(self.dt_proj, self.dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
        self.A_log = s4d_real_a_log(self.d_inner, d_state, device)
        self.D = ones_d(self.d_inner, device)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: Tensor, inference_params=None) -> Tensor:
        """hidden_states (B, L, d_model) -> (B, L, d_model). With `inference_params` (mamba-ssm's InferenceParams
        or anything with `key_value_memory_dict` and `seqlen_offset`) the conv and SSM states of layer `layer_idx`
        are filled (prefill), or, once `seqlen_offset > 0`, advanced by one token (decoding, L must be 1)."""
        batch = hidden_states.shape[0]
        conv_state = ssm_state = None
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                return out
        if use_kernels(hidden_states):
            xz = self._in_proj_channels_first(hidden_states)
            if self.use_fast_path and inference_params is None:
                return self._fused(xz, self.branch())
            y = self._scan_kernels(xz, self.branch(), conv_state, ssm_state)
            return self.out_proj(rearrange(y, "b d l -> b l d"))
        xz = self.in_proj(rearrange(hidden_states, "b l d -> l b d"))
        y = self._scan_portable(xz, self.branch(), conv_state, ssm_state)
        return self.out_proj(rearrange(y, "l b d -> b l d"))

    def branch(self, suffix: str = "") -> Branch:
        """The per-direction parameters (suffix "" here; "_b" for the backward scan of BidirectionalMamba)."""
        a_log = getattr(self, "A_log" if not suffix else f"A{suffix}_log")
        return Branch(getattr(self, "conv1d" + suffix), getattr(self, "x_proj" + suffix),
                      getattr(self, "dt_proj" + suffix), a_log, getattr(self, "D" + suffix))

    def _in_proj_channels_first(self, hidden_states: Tensor) -> Tensor:
        """in_proj straight into mamba-ssm's kernel layout (B, 2*d_inner, L)."""
        xz = rearrange(self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"), "d (b l) -> b d l",
                       l=hidden_states.shape[1])
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype).unsqueeze(-1)
        return xz

    def _fused(self, xz: Tensor, br: Branch) -> Tensor:
        """mamba-ssm's fused conv + scan + out_proj kernel; xz (B, 2*d_inner, L) -> (B, L, d_model)."""
        return get_kernel("mamba_inner_fn")(
            xz, br.conv1d.weight, br.conv1d.bias, br.x_proj.weight, br.dt_proj.weight, self.out_proj.weight,
            self.out_proj.bias, -torch.exp(br.A_log.float()), None, None, br.D.float(),
            delta_bias=br.dt_proj.bias.float(), delta_softplus=True,
        )

    def _scan_kernels(self, xz: Tensor, br: Branch, conv_state=None, ssm_state=None) -> Tensor:
        """Conv and scan kernels one by one (they can fill decoding states); xz (B, 2*d_inner, L) -> y (B, d_inner, L)."""
        seqlen = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        if conv_state is not None:
            conv_state.copy_(F.pad(x, (self.d_conv - seqlen, 0)))
        x = causal_conv1d_fn(x, rearrange(br.conv1d.weight, "d 1 w -> d w"), br.conv1d.bias,
                             activation=self.activation)
        x_dbl = br.x_proj(rearrange(x, "b d l -> (b l) d"))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = rearrange(br.dt_proj.weight @ dt.t(), "d (b l) -> b d l", l=seqlen)
        B = rearrange(B, "(b l) n -> b n l", l=seqlen).contiguous()
        C = rearrange(C, "(b l) n -> b n l", l=seqlen).contiguous()
        y = selective_scan_fn(x, dt, -torch.exp(br.A_log.float()), B, C, br.D.float(), z=z,
                              delta_bias=br.dt_proj.bias.float(), delta_softplus=True,
                              return_last_state=ssm_state is not None)
        if ssm_state is not None:
            y, last = y
            ssm_state.copy_(last)
        return y

    def _scan_portable(self, xz: Tensor, br: Branch, conv_state=None, ssm_state=None) -> Tensor:
        """Time-major (the portable scan's layout, no transposes of the states): xz (L, B, 2*d_inner) ->
        y (L, B, d_inner), before out_proj."""
        x, z = xz.chunk(2, dim=-1)
        x_bdl = rearrange(x, "l b d -> b d l")
        if conv_state is not None:
            conv_state.copy_(F.pad(x_bdl, (self.d_conv - x_bdl.shape[-1], 0)))
        x_bdl = causal_conv1d_fn(x_bdl, rearrange(br.conv1d.weight, "d 1 w -> d w"), br.conv1d.bias,
                                 activation=self.activation)
        x = rearrange(x_bdl, "b d l -> l b d")
        dt, B, C = torch.split(br.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        cd = compute_dtype(x.dtype)
        delta = F.softplus(F.linear(dt, br.dt_proj.weight).to(cd) + br.dt_proj.bias.to(cd))
        y, last = selective_scan_tm(x, delta, -torch.exp(br.A_log.float()), B.unsqueeze(2), C.unsqueeze(2), br.D, z)
        if ssm_state is not None:
            ssm_state.copy_(last)
        return y

    # -- recurrent decoding -------------------------------------------------------------------------------------
    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor):
        """One token: hidden_states (B, 1, d_model); conv_state (B, d_inner, d_conv) and ssm_state
        (B, d_inner, d_state) are updated in place. Returns (out (B, 1, d_model), conv_state, ssm_state)."""
        if hidden_states.shape[1] != 1:
            raise ValueError("step decodes one token at a time")
        x, z = self.in_proj(hidden_states.squeeze(1)).chunk(2, dim=-1)
        x = causal_conv1d_update(x, conv_state, rearrange(self.conv1d.weight, "d 1 w -> d w"), self.conv1d.bias,
                                 self.activation)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias goes in as dt_bias
        y = selective_state_update(ssm_state, x, dt, -torch.exp(self.A_log.float()), B, C, self.D, z=z, dt_bias=self.dt_proj.bias,
                                   dt_softplus=True)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zeroed (conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state)) for `step`."""
        device = self.out_proj.weight.device
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device,
                                 dtype=self.conv1d.weight.dtype if dtype is None else dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=self.dt_proj.weight.dtype if dtype is None else dtype)
        return conv_state, ssm_state
