"""VMamba v0 (`models.vmamba`) against VMamba's own code: numbers recorded from VMamba's v0 classifier
(`classification/models/vmamba/vmamba.py` @b2faf50, mamba-ssm's `selective_scan_ref`) on weights this file draws
(`v0_weights`), produced by `python benchmarks/fidelity.py vmamba_v0 <VMamba export> --record` (docs/fidelity.md);
the classifier's order (LayerNorm on every position, then the average pool) and VMamba's LayerNorm eps (1e-5)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import models  # noqa: F401 - registers the timm names
from models.vmamba import VMambaV0

# The recorded config: embed 16, depths 1/1/2/1, d_state 8, 1000 classes, one 64x96 image (seed 1).
RECORD = dict(embed_dim=16, depths=(1, 1, 2, 1), d_state=8, num_classes=1000)
INPUT_HW = (64, 96)
# VMamba's own outputs on v0_weights (benchmarks/fidelity.py vmamba_v0 ... --record).
LOGITS_SUM = -1.266929344739765
LOGITS_ABS_SUM = 382.5757262320258
LOGITS_FIRST = [-0.279091, 0.267703, 0.42718, -0.461785, 0.149234, 0.030748]
POOLED_FIRST = [-0.209691, -0.200405, -0.230037, 0.595903, -0.192412, 0.471238]
STAGE4_ABS_SUM = 699.031257390976


def v0_weights(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic weights for `model`'s state_dict (our key names), off every init: drawn key by key in sorted
    order from one seeded generator, scaled per kind (LayerNorm weights near 1, A_logs near log(1..N), dt biases
    at softplus^-1 of ~0.02, Ds near 1, the rest N(0, 1/fan_in))."""
    g = torch.Generator().manual_seed(seed)
    own = model.state_dict()
    out = {}
    for key in sorted(own):
        shape = own[key].shape
        r = torch.randn(shape, generator=g)
        if key.endswith("A_logs"):
            v = torch.log(torch.arange(1, shape[-1] + 1, dtype=torch.float32)).expand(shape) + 0.1 * r
        elif key.endswith("Ds"):
            v = 1 + 0.1 * r
        elif key.endswith("dt_projs_bias"):
            v = -4 + 0.5 * r
        elif "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight"):
            v = 1 + 0.1 * r
        elif key.endswith(".bias"):
            v = 0.1 * r
        else:
            v = r / math.sqrt(max(1, math.prod(shape[1:])))
        out[key] = v.contiguous()
    return out


def record_input() -> torch.Tensor:
    return torch.randn(1, 3, *INPUT_HW, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def recorded_model() -> VMambaV0:
    model = VMambaV0(**RECORD).eval()
    model.load_state_dict(v0_weights(model), strict=True)
    return model


def test_matches_numbers_recorded_from_vmamba_code(recorded_model):
    x = record_input()
    with torch.no_grad():
        outs, _ = recorded_model.stages(x)
        pooled = recorded_model.forward_head(outs[-1], pre_logits=True)
        logits = recorded_model(x)
    rel = dict(rtol=1e-4, atol=0)
    torch.testing.assert_close(logits.double().sum().item(), LOGITS_SUM, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits.double().abs().sum().item(), LOGITS_ABS_SUM, **rel)
    torch.testing.assert_close(outs[-1].double().abs().sum().item(), STAGE4_ABS_SUM, **rel)
    torch.testing.assert_close(logits[0, :6].tolist(), LOGITS_FIRST, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(pooled[0, :6].tolist(), POOLED_FIRST, rtol=1e-4, atol=2e-6)


def test_classifier_normalises_every_position_then_pools():
    torch.manual_seed(0)
    model = timm.create_model("vmamba_micro_v0", num_classes=5).eval()
    with torch.no_grad():
        for p in model.norm.parameters():
            p.add_(torch.randn_like(p))
        feats = model.forward_features(torch.randn(2, 3, 64, 64))
        ln = nn.functional.layer_norm(feats, feats.shape[-1:], model.norm.weight, model.norm.bias, 1e-5)
        pooled = ln.mean(dim=(1, 2))
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled)
        torch.testing.assert_close(model.forward_head(feats), pooled @ model.head.weight.T + model.head.bias)


@pytest.mark.parametrize("name", ["vmamba_micro_v0", "vmamba_tiny_v0"])
def test_every_layernorm_has_vmamba_eps(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert eps["layers.0.blocks.0.norm"] == 1e-5
    assert set(eps.values()) == {1e-5}, {n: e for n, e in eps.items() if e != 1e-5}
