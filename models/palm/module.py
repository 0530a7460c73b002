"""`PalmDiffusion`: the LightningModule of the palm task (diffusion training, EMA, sampling, the sample grid)."""
from __future__ import annotations

import torch
from torch import Tensor

from model_config import PalmConfig
from models.palm.model import build_diffusion
from zoo.errors import ZooError
from zoo.module import ZooModule

EMA_PREFIX = "ema.ema_model."


class PalmDiffusion(ZooModule):
    """Palm-image diffusion model (task "palm"): the library's `GaussianDiffusion` over our Unet (models/palm/model.py).

    Training: `diffusion(images)` with images (B, 3, S, S) in [0, 1] -> the library's loss (random timestep, MSE on
    `cfg.objective`, its SNR weighting). EMA: ema-pytorch's `EMA` exactly as the library's trainer keeps it (decay
    `cfg.ema_decay`, one update call per optimizer step, averaging every `cfg.ema_update_every` calls, a plain copy
    until `cfg.ema_update_after_step`). The EMA copy is a submodule, so checkpoints hold both weight sets and
    `PalmDiffusion.load_from_checkpoint(path)` gives a model whose `sample` / `ema_diffusion` are the EMA weights;
    the raw weights (`diffusion`) are only for training and resuming.

    Validation: the same loss at fixed timesteps and noise (seeded per batch), for the EMA weights (`val/loss`, the
    checkpoint monitor) and the raw ones (`val/loss_raw`).
    """

    TASK = "palm"
    CONFIG = PalmConfig

    def __init__(self, config=None, task=None, **overrides):
        super().__init__(config, task, **overrides)
        from ema_pytorch import EMA

        cfg = self.cfg
        self.net = build_diffusion(cfg)
        self.ema = EMA(self.net, beta=cfg.ema_decay, update_every=cfg.ema_update_every,
                       update_after_step=cfg.ema_update_after_step, include_online_model=False)

    # ----- the EMA -----
    def parameter_count(self) -> int:
        """The denoiser's parameters, without the EMA copy."""
        return sum(p.numel() for p in self.net.parameters())

    @property
    def has_ema(self) -> bool:
        """True once the EMA has been initialised by a training step (a checkpoint saved before has none)."""
        return bool(self.ema.initted)

    @property
    def ema_diffusion(self):
        """The EMA copy of the diffusion model (a `GaussianDiffusion`), the one every sample comes from."""
        if not self.has_ema:
            raise ZooError("This palm checkpoint has no EMA weights (it was saved before the first optimizer step, "
                           "or written without them). Train it for at least one step (`python train.py --model palm "
                           "--resume CKPT`), or pass --raw-weights to sample from the raw weights.")
        return self.ema.ema_model

    def sampling_diffusion(self, raw: bool = False):
        """The diffusion to sample from: the EMA copy, or with `raw` the training weights."""
        return self.net if raw else self.ema_diffusion

    def optimizer_step(self, *args, **kwargs) -> None:
        # One EMA call per optimizer step (not per micro-batch under gradient accumulation), as the library's trainer.
        # Here rather than in on_train_batch_end: callbacks' batch-end hooks (the step checkpoint) run before the
        # module's, and a checkpoint must hold the EMA of the step it was taken at, or a resume is not exact.
        super().optimizer_step(*args, **kwargs)
        self.ema.update()

    # ----- training -----
    def forward(self, images: Tensor) -> Tensor:
        """The diffusion loss of a batch (B, 3, S, S) in [0, 1] at random timesteps (raw weights)."""
        return self.net(images)

    def setup(self, stage: str) -> None:
        """`pretrained`: a new run (never a resume, never a checkpoint's own weights) starts from the released
        model-88.pt's EMA weights, in the network and its EMA copy alike."""
        if stage == "fit" and self.cfg.pretrained and self.starts_fresh:
            from models.palm.convert import RELEASE_FILE, released_weights

            state = released_weights(self.cfg)
            for target in (self.net, self.ema.ema_model):
                try:
                    target.load_state_dict(state)
                except RuntimeError as e:
                    raise ZooError(f"pretrained=true: the released weights do not fit this network ({str(e)[:300]}). "
                                   f"Use --preset published without size overrides.") from None
            print(f"[palm] loaded the EMA weights of the released {RELEASE_FILE} "
                  f"({len(state)} tensors) into the network and its EMA copy")

    def fetch_released(self) -> None:
        if self.cfg.pretrained:
            from models.palm.convert import released_weights

            released_weights(self.cfg)

    def on_fit_start(self) -> None:
        if self.cfg.max_steps > 0 and self.trainer.max_steps in (-1, None):
            self.trainer.fit_loop.epoch_loop.max_steps = int(self.cfg.max_steps)

    def training_step(self, batch, batch_idx):
        images, _ = batch
        loss = self.net(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def fixed_loss(self, diffusion, images: Tensor, seed: int) -> Tensor:
        """The loss at timesteps and noise drawn from `seed` (comparable between evaluations)."""
        g = torch.Generator().manual_seed(int(seed))
        t = torch.randint(0, diffusion.num_timesteps, (len(images),), generator=g).to(images.device)
        noise = torch.randn(images.shape, generator=g).to(images)
        return diffusion.p_losses(diffusion.normalize(images), t, noise=noise)

    def validation_step(self, batch, batch_idx):
        images, _ = batch
        seed = int(self.cfg.seed) * 100_003 + batch_idx
        if self.has_ema:
            self.log("val/loss", self.fixed_loss(self.ema.ema_model, images, seed), prog_bar=True,
                     batch_size=len(images), sync_dist=True)
            self.log("val/loss_raw", self.fixed_loss(self.net, images, seed), batch_size=len(images), sync_dist=True)
        else:  # sanity check before the first step
            self.log("val/loss", self.fixed_loss(self.net, images, seed), prog_bar=True, batch_size=len(images),
                     sync_dist=True)

    def test_step(self, batch, batch_idx):
        images, _ = batch
        self.log("test/loss", self.fixed_loss(self.ema_diffusion, images, int(self.cfg.seed) * 100_003 + batch_idx),
                 batch_size=len(images), sync_dist=True)

    # ----- sampling -----
    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, steps: int | None = None, raw: bool = False) -> Tensor:
        """`n` independent palms from the EMA weights: (n, 3, S, S) float in [0, 1], deterministic for a seed
        (DDIM, `steps` default `cfg.sampling_steps`, eta `cfg.ddim_eta`)."""
        from models.palm.sampling import ddim_sample
        from models.palm.variations import seeded_noise

        diffusion = self.sampling_diffusion(raw)
        was_training = diffusion.training
        diffusion.eval()
        shape = (3, *diffusion.image_size)
        x_t = torch.stack([seeded_noise(shape, seed, k, "sample") for k in range(n)]).to(self.device)
        eta = float(self.cfg.ddim_eta)
        noise_fn = (lambda i, t: torch.stack([seeded_noise(shape, seed, k, "step", i) for k in range(n)])) if eta else None
        out = ddim_sample(diffusion, x_t, steps or self.cfg.sampling_steps, eta=eta, noise_fn=noise_fn)
        diffusion.train(was_training)
        return out

    def identity_sampler(self, steps: int | None = None, variation: float = 0.35, method: str = "renoise",
                         seed: int = 0, batch_size: int = 16, raw: bool = False):
        """A `models.palm.variations.IdentitySampler` over the EMA weights (eval mode)."""
        from models.palm.variations import IdentitySampler

        diffusion = self.sampling_diffusion(raw).eval()
        return IdentitySampler(diffusion, steps or self.cfg.sampling_steps, variation, method, seed, batch_size)

    # ----- checkpoints, callbacks, verbs -----
    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        # A checkpoint without EMA weights still opens (raw weights in the EMA slot, marked uninitialised), so the
        # verbs can say what is missing instead of failing to load.
        state = checkpoint.get("state_dict", {})
        if not any(k.startswith(EMA_PREFIX) for k in state):
            for k, v in list(state.items()):
                if k.startswith("net."):
                    state[EMA_PREFIX + k[len("net."):]] = v.clone()
            state["ema.initted"] = torch.tensor(False)
            state["ema.step"] = torch.tensor(0)

    def configure_callbacks(self):
        cfg = self.cfg
        if cfg.grid_every_n_steps <= 0 or self.trainer.fast_dev_run:
            return []
        from callbacks.sample_grid import SampleGridCallback

        return [SampleGridCallback(lambda n: self.sample(n, seed=int(cfg.seed)), every_n_steps=cfg.grid_every_n_steps,
                                   n_samples=cfg.grid_samples)]

    def predict_commands(self) -> list:
        from models.palm.verbs import COMMANDS

        return list(COMMANDS)
