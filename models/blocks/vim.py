"""Bidirectional Mamba-1 mixer in the style of Vim's "v2" bimamba (hustvl/Vim), the Mamba-1 twin of
`bidirectional.BidirectionalMamba2`.

A forward scan and a scan of the sequence reversed along the sequence axis, each with its own conv1d / x_proj /
dt_proj / A_log / D (`conv1d_b`, `x_proj_b`, `dt_proj_b`, `A_b_log`, `D_b`, Vim's names, so Vim checkpoints load);
in_proj and out_proj are shared and the two outputs are averaged before out_proj (Vim's `if_devide_out=True`).
Difference from Vim: `dt_proj_b` gets Mamba's dt initialisation like `dt_proj` (Vim leaves it at nn.Linear's default,
which makes the backward step sizes ~softplus(U(-0.3, 0.3)) instead of log-uniform in [dt_min, dt_max]).
"""
from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from .mamba import Mamba, init_dt_proj, ones_d, s4d_real_a_log
from .ops.dispatch import use_kernels


class BidirectionalMamba(Mamba):
    """Vim-style bidirectional Mamba-1 mixer: (B, L, d_model) -> (B, L, d_model).

    Constructor arguments as `Mamba`. Parameters: Mamba's plus conv1d_b (d_inner, 1, d_conv), x_proj_b
    (dt_rank + 2 d_state, d_inner), dt_proj_b (d_inner, dt_rank) + bias, A_b_log (d_inner, d_state), D_b (d_inner,).
    The output at position t depends on the whole sequence, so there is no recurrent decoding.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 layer_idx: int | None = None, device=None, dtype=None):
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor,
                         conv_bias, bias, use_fast_path, layer_idx, device, dtype)
        fk = {"device": device, "dtype": dtype}
        self.A_b_log = s4d_real_a_log(self.d_inner, d_state, device)
        self.conv1d_b = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                  bias=conv_bias, **fk)
        self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        init_dt_proj(self.dt_proj_b, self.dt_rank, dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
        self.D_b = ones_d(self.d_inner, device)

    def forward(self, hidden_states: Tensor, inference_params=None) -> Tensor:
        """hidden_states (B, L, d_model) -> (B, L, d_model)."""
        if inference_params is not None:
            raise NotImplementedError("a bidirectional mixer has no recurrent (token-by-token) form")
        fwd, bwd = self.branch(), self.branch("_b")
        if use_kernels(hidden_states):
            xz = self._in_proj_channels_first(hidden_states)
            if self.use_fast_path:
                # The fused kernel ends in out_proj; out_proj is affine, so averaging after it equals averaging
                # before it (the bias is averaged with itself).
                out = self._fused(xz, fwd)
                out_b = self._fused(xz.flip(-1), bwd)
                return (out + out_b.flip(1)) / 2
            y = (self._scan_kernels(xz, fwd) + self._scan_kernels(xz.flip(-1), bwd).flip(-1)) / 2
            return self.out_proj(rearrange(y, "b d l -> b l d"))
        xz = self.in_proj(rearrange(hidden_states, "b l d -> l b d"))
        y = (self._scan_portable(xz, fwd) + self._scan_portable(xz.flip(0), bwd).flip(0)) / 2
        return self.out_proj(rearrange(y, "l b d -> b l d"))

    def step(self, *args, **kwargs):
        raise NotImplementedError("a bidirectional mixer has no recurrent (token-by-token) form")

    def allocate_inference_cache(self, *args, **kwargs):
        raise NotImplementedError("a bidirectional mixer has no recurrent (token-by-token) form")


__all__ = ["BidirectionalMamba"]
