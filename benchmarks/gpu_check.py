"""One-call GPU check: mamba-ssm's kernels against the portable path, each task trained briefly in bf16, and speed.

    python benchmarks/gpu_check.py                      # everything, table printed and appended to RESULTS.md
    python benchmarks/gpu_check.py --skip-train --no-append

On a machine without CUDA it prints one line saying so and exits 0. On CUDA, in one process:

(a) ops: every op (selective scan, SSD chunk scan, causal conv1d, RMSNorm, SS2D) through mamba-ssm's kernels (the
    zoo's dispatch on a CUDA tensor) against its portable PyTorch twin on the same inputs, forward output and every
    input gradient, float32 and bfloat16; the figure is the max |kernel - portable| / max |portable|.
(b) training: each registered task's `micro` preset, 20 optimizer steps on its demo data with
    `--precision bf16-mixed` through train.py; the check is that every step's loss is finite and the mean of the
    last 5 is below the mean of the first 5.
(c) speed: Mamba-1 and Mamba-2 mixers (ours, kernels) against mamba-ssm's fused modules (`use_fast_path=True`,
    `use_mem_eff_path=True`), forward+backward, L=197, d_model 192, batch 64; whole networks against their timm
    peers, training step images/s under bf16 autocast at 224 px, batch 64.

The result is a markdown table, printed and appended to benchmarks/RESULTS.md (--no-append: printed only).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PORTABLE_ENV = "MAMBA_ZOO_PORTABLE"
TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2}  # max relative error accepted (kernel vs portable)
TASKS = ("demansia2", "agegender", "face", "hand", "palm")
MODEL_ROWS = (("demansia2_tiny", "deit_tiny_patch16_224"), ("vmamba_tiny_v0", "convnext_tiny"))


@contextlib.contextmanager
def portable_path(on: bool):
    """Force the portable path (the zoo's MAMBA_ZOO_PORTABLE switch, read at every call) inside the block."""
    old = os.environ.get(PORTABLE_ENV)
    os.environ[PORTABLE_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PORTABLE_ENV, None)
        else:
            os.environ[PORTABLE_ENV] = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def fwd_bwd(fn: Callable, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output of fn(**leaf copies of inputs) and the gradients of a fixed random projection of it."""
    leaves = {k: (v.detach().clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    out = fn(**leaves)
    out = out[0] if isinstance(out, tuple) else out
    g = torch.Generator(device=out.device).manual_seed(1)
    w = torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float32)
    (out.float() * w).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.grad is not None}


def compare(fn: Callable, inputs: dict[str, torch.Tensor]) -> float:
    """Max relative error, output and every gradient, of `fn` on the kernels vs on the portable path."""
    with portable_path(False):
        out_k, grads_k = fwd_bwd(fn, inputs)
    with portable_path(True):
        out_p, grads_p = fwd_bwd(fn, inputs)
    if set(grads_k) != set(grads_p):
        raise AssertionError(f"gradients differ in which inputs they reach: {sorted(grads_k)} vs {sorted(grads_p)}")
    return max([rel_err(out_k, out_p)] + [rel_err(grads_k[k], grads_p[k]) for k in grads_k])


def op_cases(dtype: torch.dtype, dev: torch.device) -> dict[str, tuple[Callable, dict]]:
    """name -> (callable, inputs): each op at a small model's sizes, `dtype` for the activations."""
    from models.blocks.ops.causal_conv import causal_conv1d_fn
    from models.blocks.ops.rms_norm import rms_norm
    from models.blocks.ops.selective_scan import selective_scan_fn
    from models.blocks.ops.ssd import mamba_chunk_scan_combined
    from models.blocks.ss2d import SS2D

    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0, offset=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=dev) * scale + offset).to(dt)

    b, d, n, length, groups = 2, 64, 16, 197, 2
    f32 = torch.float32
    scan = {"u": rnd(b, d, length), "delta": rnd(b, d, length, scale=0.5, offset=-1.0),
            "A": -torch.exp(rnd(d, n, scale=0.5, dt=f32)), "B": rnd(b, groups, n, length),
            "C": rnd(b, groups, n, length), "D": rnd(d, dt=f32), "z": rnd(b, d, length),
            "delta_bias": rnd(d, scale=0.5, dt=f32), "delta_softplus": True}
    heads, headdim, ssd_n = 8, 32, 64
    ssd = {"x": rnd(b, length, heads, headdim), "dt": rnd(b, length, heads, scale=0.5, offset=-1.0),
           "A": -torch.exp(rnd(heads, scale=0.5, dt=f32)), "B": rnd(b, length, 1, ssd_n),
           "C": rnd(b, length, 1, ssd_n), "chunk_size": 64, "D": rnd(heads, dt=f32),
           "dt_bias": rnd(heads, scale=0.5, dt=f32), "dt_softplus": True}
    conv = {"x": rnd(b, d, length), "weight": rnd(d, 4, dt=dtype), "bias": rnd(d, dt=dtype), "activation": "silu"}
    norm = {"x": rnd(b * length, 192), "weight": 1 + rnd(192, scale=0.1, dt=f32), "bias": None, "eps": 1e-5}
    ss2d = SS2D(48).to(dev)

    def ss2d_fn(x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            return ss2d(x)

    return {
        "selective_scan_fn": (selective_scan_fn, scan),
        "mamba_chunk_scan_combined (SSD)": (mamba_chunk_scan_combined, ssd),
        "causal_conv1d_fn": (causal_conv1d_fn, conv),
        "rms_norm": (rms_norm, norm),
        "SS2D (14x14, C=48)": (ss2d_fn, {"x": rnd(2, 14, 14, 48, dt=f32)}),
    }


def check_ops(dev: torch.device) -> list[tuple[str, str, str, str]]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, (fn, inputs) in op_cases(dtype, dev).items():
            try:
                err = compare(fn, inputs)
                verdict = "ok" if err <= TOL[dtype] else f"FAIL (> {TOL[dtype]})"
                rows.append((f"op {name}", str(dtype).replace("torch.", ""), f"max rel err {err:.2e}", verdict))
            except Exception as e:  # one broken op must not hide the others
                rows.append((f"op {name}", str(dtype).replace("torch.", ""), f"{type(e).__name__}: {e}"[:120], "FAIL"))
    return rows


class LossRecorder:
    """Lightning callback: the training loss of every optimizer step."""

    def __init__(self):
        import lightning as L

        class _CB(L.Callback):
            def on_train_batch_end(cb, trainer, pl_module, outputs, batch, batch_idx):  # noqa: N805
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                if loss is not None:
                    self.losses.append(float(loss.detach().float()))

        self.losses: list[float] = []
        self.callback = _CB()


def check_training(steps: int, work: str) -> list[tuple[str, str, str, str]]:
    import train

    rows = []
    for task in TASKS:
        rec = LossRecorder()
        t0 = time.perf_counter()
        try:
            train.run(["--model", task, "--preset", "micro", "--max-steps", str(steps), "--precision", "bf16-mixed",
                       "--logger", "none", "--run-name", f"gpu_check_{task}", "--limit-val-batches", "2",
                       "--epochs", "1000"], extra_callbacks=[rec.callback])
        except BaseException as e:  # noqa: BLE001  (SystemExit from a ZooError included)
            rows.append((f"train {task} micro", "bf16-mixed", f"{type(e).__name__}: {e}"[:120], "FAIL"))
            continue
        losses = rec.losses
        k = min(5, max(1, len(losses) // 2))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        finite = all(math.isfinite(v) for v in losses)
        ok = finite and len(losses) >= steps and last < first
        rows.append((f"train {task} micro, {len(losses)} steps", "bf16-mixed",
                     f"loss {first:.4g} -> {last:.4g} (means of first/last {k}), {time.perf_counter() - t0:.0f} s",
                     "ok" if ok else "FAIL" + ("" if finite else " (non-finite loss)")))
    return rows


def cuda_ms(fn: Callable, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def mixer_speed(dev: torch.device) -> list[tuple[str, str, str, str]]:
    from mamba_ssm.modules.mamba2 import Mamba2 as RefMamba2
    from mamba_ssm.modules.mamba_simple import Mamba as RefMamba

    from models.blocks.mamba import Mamba
    from models.blocks.mamba2 import Mamba2

    x = torch.randn(64, 197, 192, device=dev)
    pairs = (("Mamba-1", Mamba(192).to(dev), RefMamba(192, use_fast_path=True).to(dev)),
             ("Mamba-2 (d_state 64, headdim 32)", Mamba2(192, d_state=64, headdim=32).to(dev),
              RefMamba2(192, d_state=64, headdim=32, use_mem_eff_path=True).to(dev)))
    rows = []
    for name, ours, ref in pairs:
        def step(m):
            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    m(x).float().sum().backward()
            return run

        t_ours, t_ref = cuda_ms(step(ours)), cuda_ms(step(ref))
        rows.append((f"speed {name} fwd+bwd, B=64, L=197, d 192", "bf16 autocast",
                     f"ours {t_ours:.2f} ms, mamba-ssm fused {t_ref:.2f} ms", f"{t_ref / t_ours:.2f}x"))
    return rows


def model_speed(dev: torch.device, batch: int = 64) -> list[tuple[str, str, str, str]]:
    import timm

    import models  # noqa: F401  (registers the zoo's timm names)

    x = torch.randn(batch, 3, 224, 224, device=dev)
    rows = []
    for name, peer in MODEL_ROWS:
        ips = {}
        for n in (name, peer):
            m = timm.create_model(n, pretrained=False).to(dev).train()

            def run(m=m):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = m(x)
                (out[0] if isinstance(out, tuple) else out).float().sum().backward()

            ips[n] = batch / (cuda_ms(run, repeats=5) / 1e3)
            del m
            torch.cuda.empty_cache()
        rows.append((f"speed {name} training step, 224 px, B={batch}", "bf16 autocast",
                     f"{ips[name]:.0f} img/s, {peer} {ips[peer]:.0f} img/s", f"{ips[name] / ips[peer]:.2f}x"))
    return rows


def table(rows: list[tuple[str, str, str, str]], header: str) -> str:
    lines = [header, "", "| check | dtype | result | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per task in (b)")
    p.add_argument("--skip-train", action="store_true", help="skip (b)")
    p.add_argument("--skip-speed", action="store_true", help="skip (c)")
    p.add_argument("--no-append", action="store_true", help="print the table only, do not append to RESULTS.md")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check (run it on a GPU machine).")
        return 0
    from models.blocks.ops.dispatch import kernels_available

    dev = torch.device("cuda")
    t0 = time.perf_counter()
    if not kernels_available():
        print("gpu_check: CUDA is present but mamba-ssm's / causal-conv1d's kernels do not load: install them "
              "(setup.sh) and rerun.")
        return 1
    rows = check_ops(dev)
    if not args.skip_train:
        with tempfile.TemporaryDirectory() as work:
            cwd = os.getcwd()
            os.chdir(work)  # run folders (checkpoints/...) land in a temporary directory
            try:
                rows += check_training(args.steps, work)
            finally:
                os.chdir(cwd)
    if not args.skip_speed:
        rows += mixer_speed(dev) + model_speed(dev)
    header = (f"## GPU check: `benchmarks/gpu_check.py` on {torch.cuda.get_device_name(dev)}, torch "
              f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')} ({time.perf_counter() - t0:.0f} s)")
    text = table(rows, header)
    print(text)
    if not args.no_append:
        with open(os.path.join(ROOT, "benchmarks", "RESULTS.md"), "a") as f:
            f.write("\n" + text)
    return 1 if any(r[3].startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
