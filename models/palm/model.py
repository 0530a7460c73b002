"""The palm denoiser: denoising-diffusion-pytorch's `Unet`, optionally with the zoo's 2D selective scan (`VSSBlock`)
in place of its attention at the low resolutions, and the library's `GaussianDiffusion` around it.

`published` = upstream zebracon7/diffusion_wgan-gp_img_gen exactly: `Unet(dim=64, dim_mults=(1, 2, 4, 8),
channels=3)` (linear attention at every resolution, full attention at the innermost one and in the middle block) and
`GaussianDiffusion(image_size=128, timesteps=1000, sampling_timesteps=1000, objective="pred_noise")`. Our default
swaps the attention of the innermost `vss_levels` resolutions (down and up path) and of the middle block for a
VSSBlock: four-direction selective scans mix the whole feature map in linear time instead of the quadratic attention.
A denoiser takes (x, t), so it is not registered with timm (timm names are image backbones); build one with
`build_unet(PalmConfig.from_presets("tiny"))`.

The library is imported lazily (it pulls in accelerate), so `import models` stays fast.
"""
from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from model_config import PalmConfig


class VSSMixer(nn.Module):
    """A VSSBlock on a channels-first map, returning only its residual branch, so it drops in where the Unet does
    `x = attn(x) + x`: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2):
        super().__init__()
        from models.blocks import VSSBlock

        self.block = VSSBlock(dim, d_state=d_state, expand=expand)

    def forward(self, x: Tensor) -> Tensor:
        y = rearrange(x, "b c h w -> b h w c")
        return rearrange(self.block(y) - y, "b h w c -> b c h w")


def _attn_dim(module: nn.Module) -> int:
    """Channels of one of the library's (linear) attention modules."""
    return module.to_qkv.in_channels


def build_unet(cfg: PalmConfig) -> nn.Module:
    """The library's `Unet(cfg.unet_dim, dim_mults=cfg.dim_mults, channels=3)`; with `cfg.mixer == "vss"` the attention
    of the innermost `cfg.vss_levels` resolutions and of the middle block replaced by `VSSMixer`s."""
    from denoising_diffusion_pytorch import Unet

    unet = Unet(dim=cfg.unet_dim, dim_mults=tuple(cfg.dim_mults), channels=3, dropout=cfg.dropout)
    if cfg.mixer == "attention":
        return unet
    stages = len(unet.downs)
    levels = max(0, min(int(cfg.vss_levels), stages))

    def vss(old: nn.Module) -> VSSMixer:
        return VSSMixer(_attn_dim(old), cfg.vss_d_state, cfg.vss_expand)

    for i in range(stages - levels, stages):  # downs[0] is the full resolution
        unet.downs[i][2] = vss(unet.downs[i][2])
    for j in range(levels):  # ups[0] is the innermost resolution
        unet.ups[j][2] = vss(unet.ups[j][2])
    unet.mid_attn = vss(unet.mid_attn)
    return unet


def build_diffusion(cfg: PalmConfig) -> nn.Module:
    """The library's `GaussianDiffusion` over `build_unet(cfg)`: images (B, 3, S, S) in [0, 1] -> scalar loss."""
    from denoising_diffusion_pytorch import GaussianDiffusion

    return GaussianDiffusion(build_unet(cfg), image_size=cfg.image_size, timesteps=cfg.timesteps,
                             sampling_timesteps=min(cfg.sampling_steps, cfg.timesteps), objective=cfg.objective,
                             beta_schedule=cfg.beta_schedule, ddim_sampling_eta=cfg.ddim_eta)
