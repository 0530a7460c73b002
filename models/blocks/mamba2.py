"""The Mamba-2 mixer, interchangeable with mamba-ssm's `mamba_ssm.modules.mamba2.Mamba2`.

Same constructor arguments, parameter names, shapes and initialisation (same random draws in the same order), so
state_dicts load both ways with strict=True. On CUDA with mamba-ssm available the fused kernels run; elsewhere the
portable twins in `ops/` (ssd, causal_conv, rms_norm). Both give the same outputs and gradients.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .mamba import dt_bias_init
from .norm import RMSNormGated
from .ops.causal_conv import causal_conv1d_fn, causal_conv1d_update
from .ops.ssd import (
    gate_mlp,
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    split_zxbcdt,
    ssd_state_update,
)
from .recurrent import RecurrentCache


class Branch(NamedTuple):
    """The per-direction parameters of one scan (conv, dt bias, A, D, gated norm, out projection)."""

    conv1d: nn.Conv1d
    dt_bias: Tensor
    A_log: Tensor
    D: Tensor
    norm: nn.Module | None
    out_proj: nn.Linear


class Mamba2(RecurrentCache, nn.Module):
    """Mamba-2 mixer: (B, L, d_model) -> (B, L, d_model) (or (B*L, d_model) with `seqlen`, as in mamba-ssm).

    in_proj -> [z, xBC, dt]; causal depthwise conv + SiLU on xBC; SSD scan with nheads = d_ssm / headdim heads of
    headdim channels and ngroups shared (B, C) of d_state; gated RMSNorm(y, z); out_proj. `dt_limit` clamps the
    softplus'ed step size (also in `step`, where mamba-ssm ignores it). `chunk_size` is the scan's chunk length (the
    portable path may use shorter, equal chunks; results are the same).
    """

    # Suffixes of the scan directions whose parameters this module owns; subclasses add "_b".
    _directions: tuple[str, ...] = ("",)

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        use_mem_eff_path: bool = True,
        layer_idx: int | None = None,
        process_group=None,
        sequence_parallel: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if process_group is not None:
            raise NotImplementedError("tensor parallelism (process_group) is not supported")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.conv_init, self.expand = d_model, d_state, d_conv, conv_init, expand
        self.process_group, self.sequence_parallel, self.world_size, self.local_rank = None, sequence_parallel, 1, 0
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        if self.d_ssm % headdim:
            raise ValueError(f"d_ssm={self.d_ssm} is not a multiple of headdim={headdim}")
        self.nheads = self.d_ssm // headdim
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size, self.use_mem_eff_path, self.layer_idx = chunk_size, use_mem_eff_path, layer_idx

        # The random draws happen in mamba-ssm's order, so a seed gives the same weights in both.
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads  # [z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        for s in self._directions:
            setattr(self, "conv1d" + s, nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1,
                                                   bias=conv_bias, **factory))
        if conv_init is not None:
            for s in self._directions:
                nn.init.uniform_(getattr(self, "conv1d" + s).weight, -conv_init, conv_init)
        self.act = nn.SiLU()
        self._init_dt_A(dt_min, dt_max, dt_init_floor, A_init_range, device, dtype)
        for s in self._directions:
            D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
            D._no_weight_decay = True
            setattr(self, "D" + s, D)
        if rmsnorm:
            for s in self._directions:
                setattr(self, "norm" + s, RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                                       group_size=self.d_ssm // ngroups, **factory))
        for s in self._directions:
            setattr(self, "out_proj" + s, nn.Linear(self.d_inner, d_model, bias=bias, **factory))

    def _draw_dt_bias(self, dt_min, dt_max, dt_init_floor, device, dtype) -> Tensor:
        return dt_bias_init(self.nheads, dt_min, dt_max, dt_init_floor, device, dtype)

    def _draw_A_log(self, A_init_range, device, dtype) -> Tensor:
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"bad A_init_range {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        return torch.log(A).to(dtype=dtype)

    def _init_dt_A(self, dt_min, dt_max, dt_init_floor, A_init_range, device, dtype) -> None:
        """Create dt_bias (nheads,) and A_log (nheads,) for every direction (A = -exp(A_log), per head)."""
        dts = [self._draw_dt_bias(dt_min, dt_max, dt_init_floor, device, dtype) for _ in self._directions]
        for s, dt in zip(self._directions, dts):
            self._register_no_wd("dt_bias" + s, dt)
        A_logs = [self._draw_A_log(A_init_range, device, dtype) for _ in self._directions]
        for s, a in zip(self._directions, A_logs):
            self._register_no_wd("A_log" + s, a)

    def _register_no_wd(self, name: str, value: Tensor) -> nn.Parameter:
        p = nn.Parameter(value)
        p._no_weight_decay = True
        setattr(self, name, p)
        return p

    # ----------------------------------------------------------------------------------------------------------
    def branch(self, suffix: str = "") -> Branch:
        """The parameters of the scan direction `suffix` ("" forward, "_b" backward in subclasses)."""
        return Branch(getattr(self, "conv1d" + suffix), getattr(self, "dt_bias" + suffix),
                      getattr(self, "A_log" + suffix), getattr(self, "D" + suffix),
                      getattr(self, "norm" + suffix) if self.rmsnorm else None, getattr(self, "out_proj" + suffix))

    def _D(self, D: Tensor) -> Tensor:
        return rearrange(D, "(h p) -> h p", p=self.headdim) if self.D_has_hdim else D

    def _dt_limit_kwargs(self) -> dict:
        return {} if self.dt_limit == (0.0, float("inf")) else {"dt_limit": self.dt_limit}

    def scan_branch(self, zxbcdt: Tensor, br: Branch, seq_idx: Tensor | None = None, cu_seqlens: Tensor | None = None,
                    conv_state: Tensor | None = None, ssm_state: Tensor | None = None,
                    fused: bool | None = None) -> Tensor:
        """Everything after in_proj for one direction: zxbcdt (B, L, d_in_proj) -> (B, L, d_model).

        `fused` (default: use_mem_eff_path and no cache to fill) takes the one-call fused routine; otherwise conv,
        scan and norm are called separately, which also fills `conv_state` (B, conv_dim, d_conv) and
        `ssm_state` (B, nheads, headdim, d_state) for recurrent decoding.
        """
        A = -torch.exp(br.A_log.float())
        if fused is None:
            fused = self.use_mem_eff_path and conv_state is None and ssm_state is None
        if fused:
            return mamba_split_conv1d_scan_combined(
                zxbcdt, rearrange(br.conv1d.weight, "d 1 w -> d w"), br.conv1d.bias, br.dt_bias, A,
                D=self._D(br.D), chunk_size=self.chunk_size, seq_idx=seq_idx, activation=self.activation,
                rmsnorm_weight=br.norm.weight if br.norm is not None else None,
                rmsnorm_eps=br.norm.eps if br.norm is not None else 1e-6,
                outproj_weight=br.out_proj.weight, outproj_bias=br.out_proj.bias,
                headdim=None if self.D_has_hdim else self.headdim, ngroups=self.ngroups,
                norm_before_gate=self.norm_before_gate, **self._dt_limit_kwargs(),
            )
        z0, x0, z, xBC, dt = split_zxbcdt(zxbcdt, self.d_ssm, self.ngroups, self.d_state, self.nheads)
        xBC_t = xBC.transpose(1, 2)
        if conv_state is not None:
            # Zero-padded on the left when the prompt is shorter than the conv window.
            conv_state.copy_(F.pad(xBC_t, (self.d_conv - xBC_t.shape[-1], 0)))
        xBC = causal_conv1d_fn(xBC_t, rearrange(br.conv1d.weight, "d 1 w -> d w"), br.conv1d.bias,
                               activation=self.activation, seq_idx=seq_idx).transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = mamba_chunk_scan_combined(
            rearrange(x, "b l (h p) -> b l h p", p=self.headdim), dt, A,
            rearrange(B, "b l (g n) -> b l g n", g=self.ngroups), rearrange(C, "b l (g n) -> b l g n", g=self.ngroups),
            chunk_size=self.chunk_size, D=self._D(br.D),
            z=rearrange(z, "b l (h p) -> b l h p", p=self.headdim) if br.norm is None else None,
            dt_bias=br.dt_bias, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
            return_final_states=ssm_state is not None, **self._dt_limit_kwargs(),
        )
        if ssm_state is not None:
            y, last_state = y[0], y[1]
            ssm_state.copy_(last_state)
        y = rearrange(y, "b l h p -> b l (h p)")
        if br.norm is not None:
            y = br.norm(y, z)
        y = gate_mlp(y, z0, x0)
        return br.out_proj(y)

    def forward(self, u: Tensor, seqlen: int | None = None, seq_idx: Tensor | None = None,
                cu_seqlens: Tensor | None = None, inference_params=None) -> Tensor:
        """u: (B, L, d_model), or (B*L, d_model) with `seqlen` = L. `inference_params` (mamba-ssm's InferenceParams
        or anything with `key_value_memory_dict` and `seqlen_offset`) fills / advances the recurrent cache."""
        seqlen_og = seqlen
        batch = u.shape[0] if seqlen is None else u.shape[0] // seqlen
        conv_state = ssm_state = None
        if inference_params is not None:
            if cu_seqlens is not None:
                raise NotImplementedError("varlen inference (cu_seqlens) is not supported")
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(u, conv_state, ssm_state)
                return out
        zxbcdt = self.in_proj(u)
        if seqlen_og is not None:
            zxbcdt = rearrange(zxbcdt, "(b l) d -> b l d", l=seqlen)
        out = self.scan_branch(zxbcdt, self.branch(), seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                               conv_state=conv_state, ssm_state=ssm_state)
        return rearrange(out, "b l d -> (b l) d") if seqlen_og is not None else out

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding step: hidden_states (B, 1, d_model) -> (B, 1, d_model); the states are updated in place."""
        if hidden_states.shape[1] != 1:
            raise ValueError("step decodes one token at a time")
        br = self.branch()
        zxbcdt = self.in_proj(hidden_states.squeeze(1))
        z0, x0, z, xBC, dt = split_zxbcdt(zxbcdt, self.d_ssm, self.ngroups, self.d_state, self.nheads)
        xBC = causal_conv1d_update(xBC, conv_state, rearrange(br.conv1d.weight, "d 1 w -> d w"), br.conv1d.bias,
                                   self.activation)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(br.A_log.float())
        y = ssd_state_update(
            ssm_state, rearrange(x, "b (h p) -> b h p", p=self.headdim), dt, A,
            rearrange(B, "b (g n) -> b g n", g=self.ngroups), rearrange(C, "b (g n) -> b g n", g=self.ngroups),
            D=self._D(br.D), z=rearrange(z, "b (h p) -> b h p", p=self.headdim) if br.norm is None else None,
            dt_bias=br.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
        )
        y = rearrange(y, "b h p -> b (h p)")
        if br.norm is not None:
            y = br.norm(y, z)
        y = gate_mlp(y, z0, x0)
        return br.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zero states: conv (B, conv_dim, d_conv) and ssm (B, nheads, headdim, d_state)."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_conv, self.conv1d.weight.shape[0], device=device,
                                 dtype=conv_dtype).transpose(1, 2)
        ssm_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state
