"""Released upstream weights for `pretrained=true`: downloaded once, converted on first use, cached as safetensors.

A network's timm `pretrained_cfg` says where its weights come from:

    url          the download address (a direct link, or `https://drive.google.com/uc?id=<ID>` for Google Drive)
    notes        "file=<the released file's name>; sha256=<hex>" (sha256 only where upstream publishes one)
    license      the weights' licence;  description: the published metric;  origin_url: the upstream project

`pretrained_state(name, cfg, convert)` returns the network's state_dict: from `<cache>/<name>.safetensors` when it
exists; else from the released file in `<cache>` (downloaded when missing and the network is allowed), checked
against its sha256, read as data and turned into the network's names by `convert` (a function of the task, e.g.
`models.demansia2.model.released_state`), then cached. The cache folder is `$MAMBA_ZOO_CACHE`, else
`$XDG_CACHE_HOME/mamba-zoo`, else `~/.cache/mamba-zoo`. Offline (`HF_HUB_OFFLINE=1` / `ZOO_OFFLINE=1`) without the
file: a `ZooError` naming the URL, the file name and the folder to put it in.

This module is framework: it never imports `models/`; the task passes its config and converter in.
"""
from __future__ import annotations

import hashlib
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError

CACHE_ENV = "MAMBA_ZOO_CACHE"


def cache_dir() -> Path:
    """Where released files and their converted safetensors live."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mamba-zoo"


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "ZOO_OFFLINE"))


def release_info(cfg: Mapping[str, Any] | Any) -> dict[str, str]:
    """url, file, sha256 (may be ""), license, description of a pretrained_cfg (a dict or timm's PretrainedCfg)."""
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    notes = dict(kv.strip().split("=", 1) for kv in (get("notes") or "").split(";") if "=" in kv)
    url = get("url") or ""
    name = notes.get("file") or urllib.parse.unquote(url.rstrip("/").rsplit("/", 1)[-1])
    return {"url": url, "file": name, "sha256": notes.get("sha256", ""), "license": get("license") or "",
            "description": get("description") or ""}


def sha256sum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _drive_id(url: str) -> str | None:
    q = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
    return q["id"][0] if "drive.google.com" in url and "id" in q else None


def download(url: str, dst: Path) -> None:
    """Fetch `url` to `dst` (through a temporary name of this process, so a cut-off download never looks complete
    and the ranks of a multi-GPU run, which each set up their model, never write into one file)."""
    part = dst.with_name(f"{dst.name}.{os.getpid()}.part")
    dst.parent.mkdir(parents=True, exist_ok=True)
    drive = _drive_id(url)
    try:
        if drive:
            try:
                import gdown
            except ImportError:
                raise ZooError(f"{dst.name} is on Google Drive ({url}): install gdown (`pip install gdown`) or "
                               f"download it by hand into {dst.parent}.") from None
            if gdown.download(id=drive, output=str(part), quiet=False) is None:
                raise OSError("gdown could not fetch the file")
        else:
            print(f"[zoo] downloading {url} -> {dst}", file=sys.stderr)
            with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:  # noqa: S310 - https URLs
                while block := r.read(1 << 20):
                    f.write(block)
    except ZooError:
        raise
    except Exception as e:  # noqa: BLE001 - any network / HTTP / disk failure: the same advice
        part.unlink(missing_ok=True)
        raise ZooError(f"Could not download {url} ({type(e).__name__}: {str(e)[:120]}). Download {dst.name} by hand "
                       f"and put it in {dst.parent}.") from None
    part.replace(dst)


def released_file(name: str, cfg: Mapping[str, Any] | Any) -> Path:
    """The released file of network `name` in the cache, downloaded if missing (unless offline) and checked."""
    info = release_info(cfg)
    if not info["url"] or not info["file"]:
        raise ZooError(f"{name} has no released weights (its pretrained_cfg names no url).")
    folder = cache_dir()
    raw = folder / info["file"]
    if not raw.is_file():
        if offline():
            raise ZooError(f"{name}: pretrained weights are not in the cache and downloads are off (offline): "
                           f"download {info['url']} and put the file '{info['file']}' in {folder}.")
        download(info["url"], raw)
    if info["sha256"]:
        digest = sha256sum(raw)
        if digest != info["sha256"]:
            raise ZooError(f"{raw}: sha256 {digest[:16]}... is not the released file's {info['sha256'][:16]}...: "
                           f"the download is incomplete or another file. Delete it and download {info['url']} again.")
    return raw


def pretrained_state(name: str, cfg: Mapping[str, Any] | Any,
                     convert: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Network `name`'s released weights under its own names, converted once and cached as safetensors."""
    from safetensors.torch import load_file, save_file

    cached = cache_dir() / f"{name}.safetensors"
    if cached.is_file():
        try:
            return load_file(str(cached), device="cpu")
        except Exception:  # noqa: BLE001 - a cut-off cache file is converted again from the release
            cached.unlink(missing_ok=True)
    raw = released_file(name, cfg)
    state = convert(raw)
    shared = _dedupe(state)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.part")
    save_file(shared, str(tmp), metadata={"source": release_info(cfg)["url"], "file": raw.name})
    tmp.replace(cached)
    print(f"[zoo] {name}: converted {raw.name} once; cached as {cached}", file=sys.stderr)
    return state


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: store a contiguous copy of each."""
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def load_pretrained(model: torch.nn.Module, name: str, cfg: Mapping[str, Any] | Any,
                    convert: Callable[[Path], dict[str, torch.Tensor]], strict: bool = True) -> torch.nn.Module:
    """Load `pretrained_state` into `model`; a key or shape mismatch is a ZooError naming them."""
    state = pretrained_state(name, cfg, convert)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ZooError(f"{name}: the released weights do not fit this network ({str(e)[:300]}). Build it with the "
                       f"released sizes (no size overrides with pretrained=True).") from None
    return model


__all__ = ["CACHE_ENV", "cache_dir", "download", "load_pretrained", "offline", "pretrained_state", "release_info",
           "released_file"]
