"""One dispatch mechanism for every op: mamba-ssm's fused CUDA/Triton kernel, or its portable PyTorch twin.

`kernel_op(kernel_name, portable, positional=k)` turns a portable function into the op: a call runs the kernel called
`kernel_name` when `use_kernels(first argument)` is true, else `portable`. The op has the portable function's
signature (which equals the kernel's); the kernel gets the first `positional` arguments by position and every other
argument by keyword *only when it differs from its default* (so a kernel, or a reference standing in for one, never
sees an option it might not know, e.g. `seq_idx=None`). Arguments named in `portable_only` (our extensions) send a
call to the portable twin on every device when given; `to_kernel(kernel, *args, **kwargs)` adapts arguments where the
kernel's convention differs.

`use_kernels(x)` is true only when `x` lives on a CUDA device, ``MAMBA_ZOO_PORTABLE`` is not ``"1"`` (set it to
force the portable path on a GPU), and mamba-ssm's and causal-conv1d's extensions import. mamba-ssm is imported
lazily, once, and only when a CUDA tensor asks; if it is installed but its kernels fail to load, one warning names
the error (the portable path then runs).

Portable twins compute in float32 (float64 stays float64), also under `torch.autocast`, as the kernels do: the op
turns autocast off around them, so their matrix products and convolutions never drop to bf16/fp16; outputs come back
in the input dtype. Tests use `route_kernels({...})` to force the kernel code path on any device with
same-signature stand-ins (mamba-ssm's `*_ref` functions).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
import warnings
from collections.abc import Callable, Iterator

import torch

PORTABLE_ENV = "MAMBA_ZOO_PORTABLE"

# name -> (module, attribute): mamba-ssm's and causal-conv1d's public function names.
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
# Probed by `kernels_available`: if these load, the others do.
_PROBED = ("mamba_chunk_scan_combined", "causal_conv1d_fn", "selective_scan_fn")

_available: bool | None = None
_resolved: dict[str, Callable] = {}
_routes: list[dict[str, Callable]] = []
OPS: dict[str, Callable] = {}  # op name -> op, every op built by `kernel_op`


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype portable ops compute in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
            for name in _PROBED:
                _resolve(name)
            _available = True
        except Exception as err:  # ImportError, or a CUDA/Triton failure while importing
            _available = False
            if importlib.util.find_spec("mamba_ssm") is not None:
                warnings.warn(f"mamba-ssm is installed but its kernels failed to load ({type(err).__name__}: {err}); "
                              f"using the portable PyTorch path", RuntimeWarning, stacklevel=2)
    return _available


def use_kernels(x: torch.Tensor) -> bool:
    """True when the op holding `x` should call the fused kernels (see the module docstring)."""
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


def _is_default(value, default) -> bool:
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor) or default is inspect.Parameter.empty:
        return False
    try:
        return bool(value == default) if not isinstance(default, tuple) else tuple(value) == default
    except (TypeError, ValueError):
        return False


def run_portable(portable: Callable, x: torch.Tensor, *args, **kwargs):
    """Call a portable twin with autocast off on x's device (it computes in float32, see the module docstring)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return portable(x, *args, **kwargs)
    return portable(x, *args, **kwargs)


def autocast_off(portable: Callable) -> Callable:
    """A portable function that computes in float32 under autocast (for twins the blocks call directly)."""

    @functools.wraps(portable)
    def op(x, *args, **kwargs):
        return run_portable(portable, x, *args, **kwargs)

    return op


def kernel_op(kernel: str, portable: Callable, *, positional: int, portable_only: tuple[str, ...] = (),
              to_kernel: Callable | None = None, name: str | None = None) -> Callable:
    """The op `name` (default: the kernel's name) dispatching between `kernel` and `portable` (module docstring)."""
    if kernel not in KERNEL_SOURCES:
        raise KeyError(f"unknown kernel {kernel!r}")
    sig = inspect.signature(portable)
    params = list(sig.parameters.values())
    head = [p.name for p in params[:positional]]

    def call_kernel(bound: inspect.BoundArguments):
        args = [bound.arguments.get(n, sig.parameters[n].default) for n in head]
        kwargs = {k: v for k, v in bound.arguments.items()
                  if k not in head and not _is_default(v, sig.parameters[k].default)}
        if any(k in kwargs for k in portable_only):
            return None
        fn = get_kernel(kernel)
        return (fn(*args, **kwargs),) if to_kernel is None else (to_kernel(fn, *args, **kwargs),)

    @functools.wraps(portable)
    def op(*args, **kwargs):
        x = args[0] if args else kwargs[params[0].name]
        if use_kernels(x):
            out = call_kernel(sig.bind(*args, **kwargs))
            if out is not None:
                return out[0]
        if args:
            return run_portable(portable, *args, **kwargs)
        return run_portable(portable, kwargs.pop(params[0].name), **kwargs)

    op.__name__ = op.__qualname__ = name or kernel
    op.__doc__ = (f"`{op.__name__}`: mamba-ssm's `{kernel}` kernel on CUDA, else the portable twin "
                  f"`{portable.__name__}` (same arguments).\n\n{portable.__doc__ or ''}")
    op.portable, op.kernel = portable, kernel
    OPS[op.__name__] = op
    return op
