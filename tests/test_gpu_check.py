"""benchmarks/gpu_check.py: the no-CUDA path (one line, exit 0, RESULTS.md untouched) and its op cases on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_one_line_and_exit_0():
    results = os.path.join(ROOT, "benchmarks", "RESULTS.md")
    before = os.path.getmtime(results)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0]
    assert os.path.getmtime(results) == before


def test_op_cases_run_forward_and_backward_on_the_portable_path():
    """Every op case's arguments fit its op, and the gradient reaches every floating input; on the CPU both sides
    of `compare` are the portable path, so the error is 0 (on CUDA it measures kernel vs portable)."""
    import gpu_check

    for dtype in (torch.float32, torch.bfloat16):
        for name, (fn, inputs) in gpu_check.op_cases(dtype, torch.device("cpu")).items():
            out, grads = gpu_check.fwd_bwd(fn, inputs)
            floats = {k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
            assert torch.isfinite(out.float()).all(), name
            assert set(grads) == floats, (name, sorted(grads), sorted(floats))
    fn, inputs = gpu_check.op_cases(torch.float32, torch.device("cpu"))["selective_scan_fn"]
    assert gpu_check.compare(fn, inputs) == 0.0


def test_table_verdicts():
    import gpu_check

    text = gpu_check.table([("op x", "float32", "max rel err 1e-07", "ok")], "## head")
    assert text.splitlines()[0] == "## head" and "| op x | float32 | max rel err 1e-07 | ok |" in text
