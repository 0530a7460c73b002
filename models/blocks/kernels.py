"""Kernel dispatch: when a block calls mamba-ssm's fused CUDA/Triton kernels instead of the portable PyTorch path.

`use_kernels(x)` is true only when

* `x` lives on a CUDA device,
* the environment variable ``MAMBA_ZOO_PORTABLE`` is not ``"1"`` (set it to force the portable path on a GPU, e.g. to
  compare the two or to work around a kernel bug), and
* mamba-ssm's CUDA extension and its kernels import.

mamba-ssm is imported lazily, once, and only when a CUDA tensor asks: on a CPU-only machine the import fails (and costs
seconds), so this module never touches mamba-ssm at import time or for CPU tensors.

Kernels are looked up by name with `get_kernel(name)`; the names are the keys of `KERNEL_SOURCES` (mamba-ssm's and
causal-conv1d's public function names). Tests use `route_kernels({...})` to force the kernel code path on any device
with same-signature stand-ins (mamba-ssm's `*_ref` functions), which proves each block passes every argument to the
kernels correctly without a GPU.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator

import torch

PORTABLE_ENV = "MAMBA_ZOO_PORTABLE"

# name -> (module, attribute). The first entry of each group is what `kernels_available` probes.
KERNEL_SOURCES: dict[str, tuple[str, str]] = {
    "selective_scan_fn": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    "mamba_inner_fn": ("mamba_ssm.ops.selective_scan_interface", "mamba_inner_fn"),
    "causal_conv1d_fn": ("causal_conv1d", "causal_conv1d_fn"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update"),
    "mamba_chunk_scan_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "mamba_split_conv1d_scan_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined"),
    "rms_norm_fn": ("mamba_ssm.ops.triton.layer_norm", "rms_norm_fn"),
    "layer_norm_fn": ("mamba_ssm.ops.triton.layer_norm", "layer_norm_fn"),
    "rmsnorm_fn": ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
}

_available: bool | None = None
_resolved: dict[str, Callable] = {}
_routes: list[dict[str, Callable]] = []


def portable_forced() -> bool:
    """True when ``MAMBA_ZOO_PORTABLE=1`` asks for the portable path everywhere."""
    return os.environ.get(PORTABLE_ENV, "") == "1"


def kernels_available() -> bool:
    """Whether mamba-ssm's and causal-conv1d's compiled extensions import (probed once, then cached)."""
    global _available
    if _available is None:
        try:
            # Real extensions, not the empty stand-ins tests put in sys.modules to import mamba-ssm on a CPU.
            if not hasattr(importlib.import_module("selective_scan_cuda"), "fwd"):
                raise ImportError("selective_scan_cuda is a stand-in")
            if not hasattr(importlib.import_module("causal_conv1d_cuda"), "causal_conv1d_fwd"):
                raise ImportError("causal_conv1d_cuda is a stand-in")
            for name in ("mamba_chunk_scan_combined", "causal_conv1d_fn", "selective_scan_fn"):
                _resolve(name)
            _available = True
        except Exception:  # ImportError, or a CUDA/Triton failure while importing
            _available = False
    return _available


def use_kernels(x: torch.Tensor) -> bool:
    """True when the block holding `x` should call the fused kernels (see the module docstring)."""
    if _routes:
        return True
    if not x.is_cuda or portable_forced():
        return False
    return kernels_available()


def _resolve(name: str) -> Callable:
    fn = _resolved.get(name)
    if fn is None:
        if name not in KERNEL_SOURCES:
            raise KeyError(f"unknown kernel {name!r}; known: {sorted(KERNEL_SOURCES)}")
        module, attr = KERNEL_SOURCES[name]
        fn = getattr(importlib.import_module(module), attr)
        if fn is None:
            raise ImportError(f"{module}.{attr} is None (its extension did not load)")
        _resolved[name] = fn
    return fn


def get_kernel(name: str) -> Callable:
    """The kernel called `name`: a routed stand-in inside `route_kernels`, else mamba-ssm's / causal-conv1d's own."""
    for mapping in reversed(_routes):
        if name in mapping:
            return mapping[name]
    if _routes:
        raise KeyError(f"kernel {name!r} is not routed; route_kernels got {sorted(_routes[-1])}")
    return _resolve(name)


@contextlib.contextmanager
def route_kernels(mapping: dict[str, Callable]) -> Iterator[None]:
    """Test hook: inside the block `use_kernels` is true on any device and `get_kernel(name)` returns `mapping[name]`.

    Names not in `mapping` raise KeyError, so a test learns which kernels a block really calls. Nested routes stack.
    """
    unknown = set(mapping) - set(KERNEL_SOURCES)
    if unknown:
        raise KeyError(f"unknown kernel names {sorted(unknown)}; known: {sorted(KERNEL_SOURCES)}")
    _routes.append(dict(mapping))
    try:
        yield
    finally:
        _routes.pop()
