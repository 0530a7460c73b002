"""timm backbones for the zoo's heads: any timm name, the zoo's own registered models included.

    net = create_backbone("efficientnet_b0")          # random init; net(x) -> (B, net.num_features) pooled features
    net = create_backbone("demansia2_micro")           # the zoo's Mamba backbone, registered with timm
    net = create_backbone("resnet50", pretrained=True) # published weights: local cache, else downloaded
    init_from_checkpoint(net, "checkpoints/demansia2/run/best.ckpt")  # start from another zoo task's network
    data = backbone_data_config("efficientnet_b0", image_size=160)   # input_size, mean, std, interpolation

Pretrained weights come from the local caches first (`HF_HUB_CACHE` / `HF_HOME`, `TORCH_HOME`); when they are not
there timm downloads them (Hugging Face hub or the model's URL) unless `HF_HUB_OFFLINE=1`. Offline with no cached
file, or a failed download, is a `ZooError` that says what is missing and how to get it.
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

from zoo.config_renames import upgrade_state
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
        pretrained: load the published weights: the cached file when there is one (`local_weights`), else timm
            downloads them (not when `HF_HUB_OFFLINE=1`).
        **kwargs: passed to `timm.create_model` (e.g. `drop_rate`, `img_size` for ViTs).
    """
    check_backbone_name(name)
    kwargs.setdefault("num_classes", 0)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        path = local_weights(name)
    except ZooError as missing:
        if hub_offline():
            raise ZooError(f"{missing} HF_HUB_OFFLINE=1 forbids the download: unset it on a connected machine, or "
                           f"fill the cache as above.") from None
        return _download(name, missing, **kwargs)
    with _hf_offline():
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path), "source": ""},
                                 **kwargs)


def hub_offline() -> bool:
    """True when the environment forbids downloads now (HF_HUB_OFFLINE, as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _download(name: str, missing: ZooError, **kwargs: Any) -> nn.Module:
    """timm's own download (HF hub or URL, into the usual caches); any failure becomes one ZooError."""
    print(f"[backbones] downloading the pretrained weights of '{name}' (timm / Hugging Face hub) ...", flush=True)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - network, HTTP, file-system and hub errors all mean "no weights"
        raise ZooError(f"Could not download the pretrained weights of backbone '{name}': {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:160] if str(e) else ''}. {missing}") from None


def init_from_checkpoint(net: nn.Module, path: str | os.PathLike,
                         prefixes: tuple[str, ...] = ("net.encoder.", "net.")) -> str:
    """Start `net` from the network inside a zoo checkpoint (e.g. a demansia2 run as the face / age-gender backbone).

    The checkpoint is read as data (`torch.load(weights_only=True)`); keys saved under an attribute's old name are
    renamed first (`zoo.config_renames.STATE_RENAMES`), so every task's network is under `net.`. Its state-dict keys
    are matched after removing the one of `prefixes` that fits most tensors (net.encoder. = face's encoder without its
    embedding head, net. = demansia2's network or agegender's backbone);
    every tensor of `net` whose name and shape match is copied, the rest (classifier heads, extra layers) is left as
    initialised. Returns a one-line report naming what was copied and what was not; a checkpoint that fits fewer than
    half of `net`'s tensors is a ZooError that names the checkpoint's and the backbone's layers (or the shape clashes).
    """
    from zoo.checkpoint import read_checkpoint

    path = Path(path).expanduser()
    ckpt = read_checkpoint(path)
    task = (ckpt.get("hyper_parameters") or {}).get("task", "?")
    source = upgrade_state(task, ckpt["state_dict"])
    target = net.state_dict()
    best: dict[str, Any] = {}
    best_prefix, clashes = "", []
    for prefix in prefixes:
        mapped = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
        matched = {k: v for k, v in mapped.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
        clashes += [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
                    if k in target and tuple(v.shape) != tuple(target[k].shape)]
        if len(matched) > len(best):
            best, best_prefix = matched, prefix
    if 2 * len(best) < len(target):  # a few shape-agnostic tensors (norms, per-head scalars) are no initialisation
        why = (f"{len(clashes)} names match but their shapes differ (e.g. {clashes[0]}): a different size"
               if clashes else f"it holds {_layers(source, largest_first=True)}; this backbone has {_layers(target)}")
        fit = f"only {len(best)} of {len(target)} tensors" if best else "no tensor"
        raise ZooError(f"--set init_from={path}: {fit} of that '{task}' checkpoint fits this backbone ({why}). "
                       f"Use a checkpoint whose network is this backbone with the same preset, e.g. a demansia2 run "
                       f"as backbone=demansia2_<preset>, or a face run with the same face preset.")
    net.load_state_dict(best, strict=False)
    missing = [k for k in target if k not in best]
    rest = f"; left as initialised: {_layers(missing)}" if missing else ""
    return (f"initialised {len(best)} of {len(target)} backbone tensors from the '{task}' checkpoint {path} "
            f"({best_prefix}*){rest}")


def _layers(keys, limit: int = 6, largest_first: bool = False) -> str:
    """A short summary of state-dict names: their layers (the first name part; two for blocks.<i>) with tensor
    counts, in order or the layers with most tensors first."""
    counts: dict[str, int] = {}
    for k in keys:
        layer = ".".join(k.split(".")[:2]) if k.split(".")[0] in ("blocks", "layers", "stages") else k.split(".")[0]
        counts[layer] = counts.get(layer, 0) + 1
    order = sorted(counts.items(), key=lambda kv: -kv[1]) if largest_first else list(counts.items())
    shown = [f"{layer} ({n})" for layer, n in order[:limit]]
    more = f" and {len(counts) - limit} more" if len(counts) > limit else ""
    return ", ".join(shown) + more if shown else "no tensors"


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
        f"Pretrained weights for backbone '{name}' are not in the local cache (looked in {' and '.join(candidates)}). "
        f"On a machine with network run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`, "
        f"then copy its ~/.cache/huggingface (or $HF_HOME) here, or train with --set pretrained=false."
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
