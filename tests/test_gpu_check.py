"""benchmarks/gpu_check.py on the CPU: the no-CUDA line and exit 0, and its comparison harness on the ops with
mamba-ssm's pure-PyTorch references standing in for the kernels (what the GPU run compares, minus the GPU)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_blocks_support import ssd_minimal_scan  # noqa: E402


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_cuda_prints_one_line_and_exits_0(capsys, tmp_path, monkeypatch):
    gc = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = tmp_path / "RESULTS.md"
    assert gc.main(["--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [gc.NO_CUDA] and "no CUDA" in out
    assert not results.exists()


def test_loss_falls_and_rel_err():
    gc = _gpu_check()
    assert gc.loss_falls([3.0] * 5 + [2.0] * 10 + [1.0] * 5) == (True, True)
    assert gc.loss_falls([1.0] * 10 + [2.0] * 10) == (True, False)
    assert gc.loss_falls([1.0] * 19 + [float("nan")]) == (False, False)
    assert gc.rel_err(torch.tensor([1.0, -4.0]), torch.tensor([1.0, -2.0])) == pytest.approx(1.0)


def test_op_harness_against_mamba_ssm_references(mamba_ref):
    """Kernel half through mamba-ssm's references: float32 errors within the GPU run's tolerance; a wrong stand-in
    (the scan's output doubled) is caught."""
    from models.blocks.ops.dispatch import route_kernels

    gc = _gpu_check()
    routes = {"selective_scan_fn": mamba_ref.selective_scan_ref,
              "mamba_chunk_scan_combined": ssd_minimal_scan(mamba_ref.ssd_minimal_discrete),
              "causal_conv1d_fn": mamba_ref.causal_conv1d_ref, "rms_norm_fn": mamba_ref.rms_norm_ref,
              "rmsnorm_fn": mamba_ref.gated_rms_norm_ref}
    cases = gc.op_cases(torch.device("cpu"), torch.float32, blocks=False)
    assert set(cases) == {"selective_scan_fn", "mamba_chunk_scan_combined", "causal_conv1d_fn",
                          "rms_norm (+ residual)", "gated_rms_norm"}
    for name, (fn, make, params, autocast) in cases.items():
        ef, eb = gc.compare(fn, make, params, autocast, kernel_path=lambda: route_kernels(routes))
        assert ef <= gc.TOL[torch.float32] and eb <= gc.TOL[torch.float32], (name, ef, eb)

    wrong = dict(routes, selective_scan_fn=lambda *a, **k: 2 * mamba_ref.selective_scan_ref(*a, **k))
    fn, make, params, autocast = cases["selective_scan_fn"]
    ef, eb = gc.compare(fn, make, params, autocast, kernel_path=lambda: route_kernels(wrong))
    assert ef > 0.5 and eb > 0.5
