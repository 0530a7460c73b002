"""mamba-ssm's real Triton Mamba-2 kernels, run on the CPU by Triton's interpreter, against the references and ours.

Slow (Triton import + interpretation, ~20-30 s): `pytest -m slow tests/test_blocks_ops_ssd_triton_interp.py`.
TRITON_INTERPRET must be set before triton is imported, so the kernels run in a subprocess. To run there,
`torch.cuda.device` becomes a no-op context, `torch.cuda.get_device_properties` a stand-in with
`multi_processor_count`, and `triton.autotune` keeps only the first config (nothing to benchmark).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import contextlib, json, os, sys, types
os.environ["TRITON_INTERPRET"] = "1"
import torch
import torch.nn.functional as F
import triton

_autotune = triton.autotune
triton.autotune = lambda configs, key, **kw: _autotune(configs=configs[:1], key=key, **kw)
torch.cuda.device = lambda *a, **k: contextlib.nullcontext()
torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(multi_processor_count=4)
for name in ("selective_scan_cuda", "causal_conv1d_cuda"):
    sys.modules.setdefault(name, types.ModuleType(name))
torch.set_num_threads(2)
from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as triton_scan
from models.blocks.ops.ssd import mamba_chunk_scan_combined_portable as our_scan

def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()

torch.manual_seed(0)
b, l, h, p, n, chunk = 1, 64, 2, 8, 16, 16
x = torch.randn(b, l, h, p)
dt = F.softplus(torch.randn(b, l, h) - 1)
A = -torch.rand(h) - 0.5
B, C = torch.randn(b, l, 1, n), torch.randn(b, l, 1, n)
res = {}
y = triton_scan(x, dt, A, B, C, chunk)
y_min, _ = ssd_minimal_discrete(x * dt[..., None], A * dt, B.expand(-1, -1, h, -1), C.expand(-1, -1, h, -1), chunk)
res["triton_vs_minimal"] = rel(y, y_min)
res["ours_vs_triton"] = rel(our_scan(x, dt, A, B, C, chunk), y)

# every option, outputs and gradients: triton kernels (fwd + bwd) vs our portable scan
D, z, dt_bias, init = torch.randn(h), torch.randn(b, l, h, p), torch.randn(h) - 2, torch.randn(b, h, p, n)
raw_dt = torch.randn(b, l, h)
def run(scan):
    ins = [t.clone().requires_grad_() for t in (x, raw_dt, A, B, C, D, z, dt_bias, init)]
    xx, dd, AA, BB, CC, DD, zz, bb, ii = ins
    out, final = scan(xx, dd, AA, BB, CC, chunk, D=DD, z=zz, dt_bias=bb, initial_states=ii, dt_softplus=True,
                      return_final_states=True)
    gen = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
    return [out, final, *torch.autograd.grad(loss, ins)]
names = "out final dx ddt dA dB dC dD dz ddt_bias dinit".split()
for name, a, r in zip(names, run(our_scan), run(triton_scan)):
    res["full_" + name] = rel(a, r)
print("RESULT " + json.dumps(res))
'''


@pytest.mark.slow
def test_triton_ssd_kernels_in_interpreter_match_references_and_ours():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    assert res["triton_vs_minimal"] < 3e-6, res
    assert res["ours_vs_triton"] < 3e-6, res
    for key, err in res.items():
        if key.startswith("full_"):
            assert err < 1e-4, (key, res)
