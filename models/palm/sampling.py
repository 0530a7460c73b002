"""DDIM sampling over a denoising-diffusion-pytorch `GaussianDiffusion`, with the noise passed in.

The library's `ddim_sample` draws its noise from the global RNG; identity-keeping variations need to choose the noise
of every step (shared between an individual's images or not) and to start part-way down the chain, so this loop
takes the initial noise and a per-step noise function. It uses the library's own schedule (`alphas_cumprod`), its
model predictions (`model_predictions`, x0 clipped to [-1, 1], the noise re-derived) and its time grid, so with
the same noise it reproduces `GaussianDiffusion.ddim_sample` exactly (tests/test_palm_model.py checks this).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

NoiseFn = Callable[[int, int], Tensor]  # (step index, timestep) -> (B, C, H, W) noise for that step


def time_pairs(t_start: int, steps: int) -> list[tuple[int, int]]:
    """The library's DDIM grid from `t_start` down: [(t_start, t'), ..., (t'', 0), (0, -1)] in `steps` model calls."""
    times = torch.linspace(-1, t_start, steps=steps + 1).int().tolist()
    times = list(reversed(times))
    return list(zip(times[:-1], times[1:]))


@torch.no_grad()
def ddim_sample(diffusion, x_t: Tensor, steps: int, eta: float = 0.0, noise_fn: NoiseFn | None = None,
                t_start: int | None = None, progress: Callable[[int], None] | None = None) -> Tensor:
    """Denoise `x_t` (B, C, H, W) at timestep `t_start` (default: the last, T - 1) to images in [0, 1].

    steps: model evaluations (DDIM steps); eta: 0 = deterministic DDIM, 1 = DDPM-like stochastic steps whose noise
    comes from `noise_fn(i, t)` (default: torch.randn_like). progress: called with 1 after every step.
    """
    t_start = diffusion.num_timesteps - 1 if t_start is None else int(t_start)
    img, b = x_t, x_t.shape[0]
    for i, (time, time_next) in enumerate(time_pairs(t_start, max(1, int(steps)))):
        t = torch.full((b,), time, device=img.device, dtype=torch.long)
        pred_noise, x_start, *_ = diffusion.model_predictions(img, t, None, clip_x_start=True,
                                                              rederive_pred_noise=True)
        if time_next < 0:
            img = x_start
        else:
            alpha, alpha_next = diffusion.alphas_cumprod[time], diffusion.alphas_cumprod[time_next]
            sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
            c = (1 - alpha_next - sigma ** 2).sqrt()
            img = x_start * alpha_next.sqrt() + c * pred_noise
            if eta > 0:
                noise = noise_fn(i, time) if noise_fn is not None else torch.randn_like(img)
                img = img + sigma * noise.to(img)
        if progress is not None:
            progress(1)
    return diffusion.unnormalize(img).clamp(0, 1)


def renoise(diffusion, images: Tensor, t: int, noise: Tensor) -> Tensor:
    """q(x_t | x_0): images (B, C, H, W) in [0, 1] noised to timestep `t` with the given noise (B, C, H, W)."""
    x0 = diffusion.normalize(images)
    tt = torch.full((x0.shape[0],), int(t), device=x0.device, dtype=torch.long)
    return diffusion.q_sample(x0, tt, noise=noise.to(x0))
