"""Shared Mamba building blocks: the only place a scan is written.

Modules (what a layer is) import their ops (how it is computed) from `scan.py` (Mamba-1 selective scan), `ssd.py`
(Mamba-2 chunked SSD), `conv.py` and `norm.py`; each op dispatches to mamba-ssm's kernels on CUDA (`kernels.py`) and
otherwise runs its portable PyTorch twin. `MAMBA_ZOO_PORTABLE=1` forces the portable path.
"""
from models.blocks.bidirectional import BidirectionalMamba2
from models.blocks.mamba import Mamba
from models.blocks.mamba2 import Mamba2
from models.blocks.mha import MHA
from models.blocks.norm import RMSNorm, RMSNormGated
from models.blocks.residual import Block
from models.blocks.ss2d import SS2D, VSSBlock, vmamba_key_map
from models.blocks.vim import BidirectionalMamba

__all__ = ["Mamba", "Mamba2", "BidirectionalMamba", "BidirectionalMamba2", "SS2D", "VSSBlock", "vmamba_key_map",
           "MHA", "RMSNorm", "RMSNormGated", "Block"]
