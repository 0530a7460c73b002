"""Bidirectional Mamba-2 mixer (DeMansia 2 style): a forward scan and a backward scan over one shared in_proj.

Default (`scan_mode="bidirectional"`): a true bidirectional mixer. The backward branch scans the sequence *reversed along
the sequence axis* with its own conv1d_b / dt_bias_b / A_log_b / D_b / norm_b / out_proj_b, and the two outputs are
averaged. in_proj is shared: the published mixer shares it too (so its checkpoint loads for fine-tuning with the same
keys), and it halves the largest projection; each direction still has its own conv, step sizes, decay and gating
norm, which is where the direction-specific behaviour lives.

`scan_mode="legacy"` reproduces the published DeMansia 2 mixer (catalpaaa/DeMansia-2) exactly, quirks included:
branch 2 runs on the in_proj output flipped on the *channel* axis (it never reverses the sequence), uses the forward
`D` (`D_b` exists, stays all ones and is unused, except with D_has_hdim where the published code does use it),
`dt_bias_b` / `A_log_b` are separate Parameters over the same storage as `dt_bias` / `A_log`, and the output is
(out + out_b.flip(-1)) / 2 with the flip on the d_model axis. Only needed to run the released checkpoints.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .mamba2 import Branch, Mamba2


class BidirectionalMamba2(Mamba2):
    """Bidirectional Mamba-2 mixer: (B, L, d_model) -> (B, L, d_model); constructor as `Mamba2` plus
    `scan_mode` ("bidirectional" or "legacy", the config's name). Parameters: those of Mamba2 plus conv1d_b,
    dt_bias_b, A_log_b, D_b, norm_b, out_proj_b."""

    _directions = ("", "_b")

    SCAN_MODES = ("bidirectional", "legacy")

    def __init__(self, d_model: int, *args, scan_mode: str = "bidirectional", **mamba2_kwargs):
        if scan_mode not in self.SCAN_MODES:
            raise ValueError(f"scan_mode must be one of {self.SCAN_MODES}, got {scan_mode!r}")
        # Read by _init_dt_A during Mamba2.__init__, so set before it (plain attributes, allowed pre-init).
        self.scan_mode = scan_mode
        self.legacy = scan_mode == "legacy"
        if self.legacy:
            mamba2_kwargs.pop("use_mem_eff_path", None)  # the published mixer always takes the fused routine
        super().__init__(d_model, *args, **mamba2_kwargs)

    def _init_dt_A(self, dt_min, dt_max, dt_init_floor, A_init_range, device, dtype) -> None:
        if not self.legacy:
            return super()._init_dt_A(dt_min, dt_max, dt_init_floor, A_init_range, device, dtype)
        dt = self._draw_dt_bias(dt_min, dt_max, dt_init_floor, device, dtype)
        self._register_no_wd("dt_bias", dt)
        self._register_no_wd("dt_bias_b", dt)  # a second Parameter over the same tensor, as published
        A_log = self._draw_A_log(A_init_range, device, dtype)
        self._register_no_wd("A_log", A_log)
        self._register_no_wd("A_log_b", A_log)

    def _apply(self, fn, recurse=True):
        # .to()/.half() give every Parameter its own new tensor; keep the published tie after a move.
        out = super()._apply(fn, recurse)
        if self.legacy:
            for name in ("dt_bias", "A_log"):
                fwd, bwd = getattr(self, name), getattr(self, name + "_b")
                if bwd.data_ptr() != fwd.data_ptr():
                    bwd.data = fwd.data
        return out

    def backward_branch(self) -> Branch:
        br = self.branch("_b")
        if self.legacy and not self.D_has_hdim:
            br = br._replace(D=self.D)
        return br

    def forward(self, u: Tensor, seqlen: int | None = None, seq_idx: Tensor | None = None,
                cu_seqlens: Tensor | None = None, inference_params=None) -> Tensor:
        """u: (B, L, d_model), or (B*L, d_model) with `seqlen` = L. No recurrent decoding (it needs the future)."""
        if inference_params is not None or cu_seqlens is not None:
            raise NotImplementedError("a bidirectional mixer has no recurrent (token-by-token) form")
        seqlen_og = seqlen
        zxbcdt = self.in_proj(u)
        if seqlen_og is not None:
            zxbcdt = rearrange(zxbcdt, "(b l) d -> b l d", l=seqlen)
        if self.legacy:
            out = self.scan_branch(zxbcdt, self.branch(), seq_idx=seq_idx, fused=True)
            out_b = self.scan_branch(zxbcdt.flip(-1), self.backward_branch(), seq_idx=seq_idx, fused=True)
            out = (out + out_b.flip(-1)) / 2
        else:
            if seq_idx is not None:
                raise NotImplementedError("seq_idx would need reversing per packed sequence")
            out = self.scan_branch(zxbcdt, self.branch())
            out_b = self.scan_branch(zxbcdt.flip(1), self.backward_branch())
            out = (out + out_b.flip(1)) / 2
        return rearrange(out, "b l d -> (b l) d") if seqlen_og is not None else out

    def step(self, *args, **kwargs):
        raise NotImplementedError("a bidirectional mixer has no recurrent (token-by-token) form")

    def allocate_inference_cache(self, *args, **kwargs):
        raise NotImplementedError("a bidirectional mixer has no recurrent (token-by-token) form")

    def extra_repr(self) -> str:
        return f"scan_mode={self.scan_mode!r}"


def swap_directions(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A copy of a default BidirectionalMamba2 state_dict with the forward and backward parameter sets exchanged."""
    out = dict(state_dict)
    for name in ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight",
                 "out_proj.bias"):
        head, _, tail = name.partition(".")
        a, b = prefix + name, prefix + head + "_b" + ("." + tail if tail else "")
        if a in state_dict:
            out[a], out[b] = state_dict[b], state_dict[a]
    return out
