"""The RMSNorm modules: state dicts interchangeable with mamba-ssm's."""
from __future__ import annotations

import torch

from models.blocks.norm import RMSNorm, RMSNormGated


def test_norm_state_dicts_load_both_ways(mamba_ref):
    from mamba_ssm.ops.triton.layer_norm import RMSNorm as TheirRMSNorm
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as TheirGated

    for ours, theirs in ((RMSNorm(8), TheirRMSNorm(8)), (RMSNormGated(8, group_size=4), TheirGated(8, group_size=4))):
        with torch.no_grad():
            theirs.weight.normal_()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        assert torch.equal(ours.weight, theirs.weight)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        assert ours.eps == theirs.eps == 1e-5
