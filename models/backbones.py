"""timm backbones for the zoo's heads: any timm name, the zoo's own registered models included, offline only.

    net = create_backbone("efficientnet_b0")          # random init; net(x) -> (B, net.num_features) pooled features
    net = create_backbone("demansia2_micro")           # the zoo's Mamba backbone, registered with timm
    net = create_backbone("resnet50", pretrained=True) # weights from the local HF / torch-hub cache, never the network
    data = backbone_data_config("efficientnet_b0", image_size=160)   # input_size, mean, std, interpolation

Pretrained weights are looked up in the local caches only (`HF_HUB_CACHE` / `HF_HOME`, `TORCH_HOME`) and loaded from
that file; a missing file is a `ZooError` that says how to fetch it on a connected machine.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from zoo.errors import ZooError, did_you_mean



def zoo_model_names() -> list[str]:
    """timm names the zoo's task packages register (`import models` registers them)."""
    import models

    return sorted(models.TIMM_NAMES)


def check_backbone_name(name: str) -> None:
    """Raise a `ZooError` unless `name` (optionally `arch.tag`) is a timm model, the zoo's own included."""
    zoo = zoo_model_names()
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return
    raise ZooError(f"Unknown backbone '{name}'.{did_you_mean(arch, timm.list_models())} Any timm model name works "
                   f"(list them with `python -c \"import timm; print(timm.list_models('*resnet*'))\"`), as do the "
                   f"zoo's own: {', '.join(zoo)}.")


def create_backbone(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model without classifier: `model(x)` with x (B, 3, H, W) -> pooled features (B, model.num_features).

    Args:
        name: timm model name, optionally with a pretrained tag (`efficientnet_b0.ra_in1k`).
        pretrained: load the weights timm would download, but only from the local cache (see `local_weights`).
        **kwargs: passed to `timm.create_model` (e.g. `drop_rate`, `img_size` for ViTs).
    """
    check_backbone_name(name)
    kwargs.setdefault("num_classes", 0)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    path = local_weights(name)
    with _hf_offline():
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path), "source": ""},
                                 **kwargs)


def local_weights(name: str) -> Path:
    """The cached weight file of `name`'s default (or tagged) pretrained config, or a `ZooError` saying how to get it."""
    check_backbone_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise ZooError(f"Backbone '{name}' has no published pretrained weights: use --set pretrained=false.")
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    candidates = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=_hf_cache_dir())
            if isinstance(found, str):
                return Path(found)
        candidates.append(f"{_hf_cache_dir()}/models--{cfg.hf_hub_id.replace('/', '--')}")
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url.split("?")[0])
        if path.is_file():
            return path
        candidates.append(str(path))
    raise ZooError(
        f"Pretrained weights for backbone '{name}' are not in the local cache (looked in {' and '.join(candidates)}) "
        f"and the zoo never downloads at run time. On a machine with network run "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`, then copy its "
        f"~/.cache/huggingface (or $HF_HOME) to this machine, or train with --set pretrained=false."
    )


def backbone_data_config(name: str, image_size: int | None = None) -> dict[str, Any]:
    """timm's data config for `name`: input_size (3, H, W), mean, std (0..1 RGB), interpolation, crop_pct.

    Read from the pretrained config without building the model; `image_size` overrides H and W.
    """
    check_backbone_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None:
        data = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    else:  # a model registered without a default config: build it on the meta device to read its attributes
        with torch.device("meta"):
            data = resolve_data_config({}, model=timm.create_model(name, num_classes=0))
    if image_size:
        data["input_size"] = (data["input_size"][0], int(image_size), int(image_size))
    return data


def _hf_cache_dir() -> str:
    """The HF hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


@contextmanager
def _hf_offline():
    """HF_HUB_OFFLINE=1 for the call, in the environment and in huggingface_hub's import-time constant."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm works without huggingface_hub
        constants = None
    old_const = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
