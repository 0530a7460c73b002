"""models.export: fp32 ONNX with a dynamic batch, smaller int8 ONNX, parity with PyTorch, loud failure on mismatch."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from zoo import export as export_mod
from zoo.errors import ZooError
from zoo.export import ExportSpec, export_and_check, run_onnx


class TwoOutputs(nn.Module):
    """image (B, 3, 16, 16) -> (score (B,), probability (B,)); weights dominate the file, as in real models."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 16 * 16, 256)
        self.out = nn.Linear(256, 2)

    def forward(self, x):
        h = self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))
        return h[:, 0] * 50, torch.sigmoid(h[:, 1])


def spec(batch: int = 5) -> ExportSpec:
    torch.manual_seed(0)
    return ExportSpec(TwoOutputs().eval(), (torch.randn(2, 3, 16, 16),), ["image"], ["score", "p"],
                      check=(torch.randn(batch, 3, 16, 16),))


@pytest.mark.parametrize("opset", [18, 13])
def test_round_trip_fp32_and_int8(tmp_path, opset):
    s = spec()
    report = export_and_check(s, tmp_path / "m.onnx", opset=opset)
    assert report.opset == opset and report.check_batch == 5
    assert max(report.fp32_max_abs_diff.values()) < 1e-4
    assert report.int8_bytes < 0.5 * report.onnx_bytes
    assert set(report.int8_max_abs_diff) == {"score", "p"}

    graph = onnx.load(report.onnx_path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
    x = torch.randn(7, 3, 16, 16)
    score, p = run_onnx(report.int8_path, {"image": x.numpy()})
    assert score.shape == p.shape == (7,)
    with torch.no_grad():
        ref_score, ref_p = s.module(x)
    assert np.abs(p - ref_p.numpy()).max() < 0.1  # int8 is close, not equal
    assert "MiB" in report.summary() and "int8" in report.summary()


def test_mismatch_fails_loudly(tmp_path, monkeypatch):
    real = export_mod.run_onnx
    monkeypatch.setattr(export_mod, "run_onnx", lambda path, inputs: [o + 0.5 for o in real(path, inputs)])
    with pytest.raises(ZooError, match="differs from PyTorch"):
        export_and_check(spec(), tmp_path / "m.onnx", int8=False)
