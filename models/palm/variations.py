"""Several images of one synthetic individual: identity-keeping variations of an unconditional palm diffusion model.

Two methods, both with `variation` V in [0, 1] (0 = N identical images, 1 = as far as the method goes):

- "renoise" (default): one base palm per individual (DDIM from the individual's noise), then each variation
  re-noises the base to timestep t = V * (T - 1) with its own noise and denoises it again (deterministic DDIM,
  round(V * steps) steps). The coarse structure set by the base (hand shape, crease layout) survives the partial
  re-noising; what the model re-draws below that noise level (texture, fine lines, light) varies. This is SDEdit's
  "noise part of the way and denoise", aimed at identity rather than editing.
- "shared-noise" (Diff-Palm, CVPR 2025): every image of an individual starts from the same initial noise and uses the
  same per-step noise at the late (low-noise) steps; the early steps, those with timestep >= (1 - V) * T, get
  per-image noise. Sampling is stochastic (eta = 1). Diff-Palm uses V = 0.5 with a crease-conditioned model; an
  unconditional model decides the coarse structure at those early steps, so identity drifts faster with V.

Every noise tensor is drawn from its own generator seeded by (seed, individual, image, step), so an individual's
images do not depend on the batch size, on the other individuals or on the device.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterator

import numpy as np
import torch
from torch import Tensor

from models.palm.sampling import ddim_sample, renoise

METHODS = ("renoise", "shared-noise")


def seeded_noise(shape: tuple[int, ...], *keys: int | str) -> Tensor:
    """Standard normal noise of `shape` (CPU, float32) from a generator seeded by the keys (ints or short strings)."""
    words = [int(k) if isinstance(k, int) else int.from_bytes(k.encode()[:8], "little") for k in keys]
    seed = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class IdentitySampler:
    """Draws `n` images of each synthetic individual from a `GaussianDiffusion` (see the module docstring).

    Args:
        diffusion: the library's GaussianDiffusion (the EMA copy), in eval mode, on its device.
        steps: DDIM steps of a full sample; variation: V in [0, 1]; method: "renoise" or "shared-noise";
        seed: the generation seed; batch_size: images per model call.
    Output of `individual`: (n, 3, S, S) float in [0, 1].
    """

    def __init__(self, diffusion, steps: int = 50, variation: float = 0.35, method: str = "renoise", seed: int = 0,
                 batch_size: int = 16):
        if method not in METHODS:
            raise ValueError(f"unknown variation method {method!r}: choose {', '.join(METHODS)}")
        if not 0.0 <= variation <= 1.0:
            raise ValueError(f"variation must be in [0, 1], got {variation}")
        self.diffusion, self.steps, self.variation, self.method = diffusion, int(steps), float(variation), method
        self.seed, self.batch_size = int(seed), max(1, int(batch_size))
        self.shape = (3, *diffusion.image_size)
        self.device = diffusion.betas.device
        self.T = diffusion.num_timesteps

    # ----- cost, for progress bars -----
    @property
    def renoise_t(self) -> int:
        return int(round(self.variation * (self.T - 1)))

    @property
    def renoise_steps(self) -> int:
        return max(1, int(round(self.steps * self.variation)))

    def model_calls(self, individuals: int, n: int) -> int:
        """Denoiser calls (batched) to draw `n` images of each of `individuals` individuals."""
        chunks = math.ceil(n / self.batch_size)
        if self.method == "shared-noise":
            return individuals * chunks * self.steps
        base = math.ceil(individuals / self.batch_size) * self.steps
        return base + (individuals * chunks * self.renoise_steps if self.variation > 0 else 0)

    # ----- sampling -----
    def bases(self, individuals: list[int], progress: Callable[[int], None] | None = None) -> Tensor:
        """The base palm of each individual: (len(individuals), 3, S, S) in [0, 1] (deterministic DDIM)."""
        out = []
        for c in range(0, len(individuals), self.batch_size):
            chunk = individuals[c:c + self.batch_size]
            x_t = torch.stack([seeded_noise(self.shape, self.seed, i, "base") for i in chunk]).to(self.device)
            out.append(ddim_sample(self.diffusion, x_t, self.steps, eta=0.0, progress=progress))
        return torch.cat(out)

    def individual(self, i: int, n: int, base: Tensor | None = None,
                   progress: Callable[[int], None] | None = None) -> Tensor:
        """`n` images of individual `i`; `base` (3, S, S) is its base palm when already drawn ("renoise")."""
        if self.method == "renoise":
            if base is None:
                base = self.bases([i], progress)[0]
            if self.variation == 0:
                return base.unsqueeze(0).repeat(n, 1, 1, 1)
            out = []
            for c in range(0, n, self.batch_size):
                ks = range(c, min(n, c + self.batch_size))
                eps = torch.stack([seeded_noise(self.shape, self.seed, i, k, "renoise") for k in ks]).to(self.device)
                x_t = renoise(self.diffusion, base.unsqueeze(0).expand(len(eps), -1, -1, -1), self.renoise_t, eps)
                out.append(ddim_sample(self.diffusion, x_t, self.renoise_steps, eta=0.0, t_start=self.renoise_t,
                                       progress=progress))
            return torch.cat(out)
        # shared-noise
        threshold = (1.0 - self.variation) * self.T
        out = []
        for c in range(0, n, self.batch_size):
            ks = list(range(c, min(n, c + self.batch_size)))
            x_t = seeded_noise(self.shape, self.seed, i, "base").to(self.device).expand(len(ks), -1, -1, -1)

            def noise_fn(step: int, t: int, ks=ks) -> Tensor:
                if t >= threshold and self.variation > 0:
                    return torch.stack([seeded_noise(self.shape, self.seed, i, k, "step", step) for k in ks])
                return seeded_noise(self.shape, self.seed, i, "shared", step).expand(len(ks), -1, -1, -1)

            out.append(ddim_sample(self.diffusion, x_t.contiguous(), self.steps, eta=1.0, noise_fn=noise_fn,
                                   progress=progress))
        return torch.cat(out)

    def generate(self, individuals: int, n: int, progress: Callable[[int], None] | None = None,
                 skip: Container[int] = ()) -> Iterator[tuple[int, Tensor]]:
        """(individual index, its (n, 3, S, S) images) for individuals 0 .. individuals - 1 except those in `skip`
        (already written: a resumed generation draws exactly what an uninterrupted one would). Lazy in the count."""
        for c in range(0, individuals, self.batch_size):
            chunk = [i for i in range(c, min(individuals, c + self.batch_size)) if i not in skip]
            if not chunk:
                continue
            bases = self.bases(chunk, progress) if self.method == "renoise" else [None] * len(chunk)
            for i, base in zip(chunk, bases):
                yield i, self.individual(i, n, base, progress)
