"""Shared Mamba building blocks: the only place a scan is written.

Modules (what a layer is: `mamba.py`, `mamba2.py`, `bidirectional.py`, `vim.py`, `ss2d.py`, `mha.py`, `residual.py`,
`norm.py`, `stem.py`) import their ops (how it is computed) from `ops/`: selective scan, SSD, causal conv and RMSNorm, each
dispatching to mamba-ssm's kernels on CUDA and otherwise running its portable PyTorch twin
(`ops/dispatch.py`; `MAMBA_ZOO_PORTABLE=1` forces the portable path).
"""
import importlib

# Lazy (PEP 562): importing one block must not import the others' dependencies (timm's layers pull in triton).
_EXPORTS = {
    "Mamba": "mamba", "Mamba2": "mamba2", "BidirectionalMamba": "vim", "BidirectionalMamba2": "bidirectional",
    "SS2D": "ss2d", "VSSBlock": "ss2d", "vmamba_key_map": "ss2d", "MHA": "mha", "RMSNorm": "norm",
    "RMSNormGated": "norm", "Block": "residual", "ConvStem": "stem",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"models.blocks.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'models.blocks' has no attribute {name!r}")
