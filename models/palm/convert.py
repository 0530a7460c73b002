"""Open a denoising-diffusion-pytorch `Trainer` checkpoint (`model-N.pt`, e.g. zebracon7's published `model-88.pt`)
as a palm model of this zoo.

The library's `Trainer.save` writes {"step", "model" (the GaussianDiffusion state_dict), "opt", "ema" (ema-pytorch's
`EMA` state_dict: `initted`, `step`, `online_model.*`, `ema_model.*`), "scaler", "version"}. Our `PalmDiffusion` holds
the same two networks as `diffusion.*` and `ema.ema_model.*`, so conversion renames; the EMA weights are what
`generate` samples from by default (`--raw-weights` for the others). The file does not store the constructor
arguments: the Unet's width, multipliers and attention layout are read from the tensors' shapes, the number of
timesteps from `betas`, the beta schedule and objective by comparing the stored buffers with the library's own
schedules; the image size is the published 128 (the file does not say), the rest the `published` preset.
`--set pretrained=true` starts a new training run from the released file's EMA weights (`released_weights`:
converted once and cached by zoo.pretrained).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from model_config import PalmConfig
from zoo.errors import ZooError

TRAINER_KEYS = {"step", "model", "ema"}
RELEASE_FILE = "model-88.pt"
RELEASE = dict(  # `predict.py --ckpt release:palm` (zoo.pretrained: downloaded once through gdown, then cached)
    url="https://drive.google.com/uc?id=1AaOvAYpjl3-FsEQ2WD_CtHW74REYTVTZ", notes=f"file={RELEASE_FILE}",
    license="none stated", description="128px palm generator (no figures published)",
    origin_url="https://github.com/zebracon7/diffusion_wgan-gp_img_gen")


def is_trainer_checkpoint(raw: Any) -> bool:
    return isinstance(raw, dict) and TRAINER_KEYS <= set(raw) and isinstance(raw.get("model"), dict)


def _schedule(betas: torch.Tensor) -> str:
    from denoising_diffusion_pytorch import denoising_diffusion_pytorch as ddpm

    t = betas.shape[0]
    for name in ("sigmoid", "cosine", "linear"):
        ref = getattr(ddpm, f"{name}_beta_schedule")(t)
        if torch.allclose(ref.to(betas.dtype), betas, rtol=1e-4, atol=1e-7):
            return name
    raise ZooError(f"the file's beta schedule ({t} steps) is none of the library's linear / cosine / sigmoid")


def _objective(state: dict[str, torch.Tensor]) -> str:
    ac = state["alphas_cumprod"].double()
    snr = ac / (1 - ac)
    w = state["loss_weight"].double()
    if torch.allclose(w, torch.ones_like(w)):
        return "pred_noise"
    return "pred_x0" if torch.allclose(w, snr, rtol=1e-3) else "pred_v"


def config_from_state(state: dict[str, torch.Tensor]) -> PalmConfig:
    """The published palm config with the sizes the GaussianDiffusion state_dict shows."""
    try:
        dim = state["model.init_conv.weight"].shape[0]
        stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"model\.downs\.(\d+)\.", k))})
        ins = [state[f"model.downs.{i}.0.block1.proj.weight"].shape[1] for i in stages]
        mid = state["model.mid_block1.block1.proj.weight"].shape[0]
        mults = tuple(c // dim for c in ins[1:]) + (mid // dim,)
        return PalmConfig.from_presets("published").replace(
            unet_dim=int(dim), dim_mults=mults, timesteps=int(state["betas"].shape[0]),
            sampling_steps=int(state["betas"].shape[0]), beta_schedule=_schedule(state["betas"]),
            objective=_objective(state))
    except KeyError as e:
        raise ZooError(f"the file's 'model' is not a denoising-diffusion-pytorch GaussianDiffusion over a Unet "
                       f"(no {e}).") from None


def from_release(raw: Any, path: str | Path) -> dict[str, Any] | None:
    """A zoo checkpoint dict for a Trainer checkpoint (None when `raw` is not one)."""
    if not is_trainer_checkpoint(raw):
        return None
    model = {k: v for k, v in raw["model"].items() if isinstance(v, torch.Tensor)}
    try:
        cfg = config_from_state(model)
    except ZooError as e:
        raise ZooError(f"{path}: {e}") from None
    state = {f"diffusion.{k}": v for k, v in model.items()}
    ema = raw.get("ema") if isinstance(raw.get("ema"), dict) else {}
    state.update({f"ema.{k}": v for k, v in ema.items()
                  if isinstance(v, torch.Tensor) and (k.startswith("ema_model.") or k in ("initted", "step"))})
    return {"state_dict": state, "hyper_parameters": {"task": "palm", "config": cfg.to_dict()},
            "global_step": int(raw["step"]) if isinstance(raw["step"], int) else 0, "converted_from": Path(path).name}


PRETRAINED_NAME = "palm_published"  # zoo.pretrained's cache name: <cache>/palm_published.safetensors
FITTED = ("unet_dim", "dim_mults", "timesteps", "beta_schedule", "objective")  # what a released file fixes


def released_ema_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A Trainer checkpoint's EMA GaussianDiffusion weights (`ema` -> `ema_model.*`), under the GaussianDiffusion's
    own names, read as data (zoo.pretrained converts and caches them once)."""
    from zoo.checkpoint import read_state_dict

    ema = read_state_dict(path, ("ema",), "palm release")
    state = {k[len("ema_model."):]: v for k, v in ema.items() if k.startswith("ema_model.")}
    if not state:
        raise ZooError(f"palm release {path}: its 'ema' holds no ema_model.* weights; it is not a "
                       f"denoising-diffusion-pytorch Trainer checkpoint (model-N.pt).")
    return state


def released_weights(cfg: PalmConfig) -> dict[str, torch.Tensor]:
    """The released model-88.pt's EMA weights for a GaussianDiffusion built from `cfg` (`pretrained=true`); a config
    whose network or schedule differs from the file's is a ZooError naming the fields."""
    from zoo.pretrained import pretrained_state

    state = pretrained_state(PRETRAINED_NAME, RELEASE, released_ema_state)
    released = config_from_state(state)
    differ = [f for f in FITTED if getattr(cfg, f) != getattr(released, f)]
    if differ:
        raise ZooError(f"pretrained=true loads the released {RELEASE_FILE}, whose network has "
                       f"{', '.join(f'{f}={getattr(released, f)}' for f in differ)}; this config has "
                       f"{', '.join(f'{f}={getattr(cfg, f)}' for f in differ)}. Use --preset published without "
                       f"changing those fields (or --set pretrained=false).")
    return state
