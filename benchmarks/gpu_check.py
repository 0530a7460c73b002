"""One-call GPU check: mamba-ssm's kernels against the portable path, bf16 training of every task, GPU speed.

    python benchmarks/gpu_check.py                       # all three parts; tables appended to benchmarks/RESULTS.md
    python benchmarks/gpu_check.py --parts ops train     # a subset (ops, train, speed)
    python benchmarks/gpu_check.py --results none        # print only

One process, on the first CUDA device (about 5 minutes on one H100 after set-up). Without CUDA it prints one line
saying so and exits 0.

(a) ops: every op (selective scan, SSD chunk scan, causal conv, RMSNorm with residual, gated RMSNorm) and the blocks
built on them (SS2D, Mamba-1, Mamba-2, bidirectional Mamba-2) run once through mamba-ssm's kernels and once through
the portable PyTorch twins (`MAMBA_ZOO_PORTABLE=1`, read on every call by `models.blocks.ops.dispatch`), same inputs,
forward and backward (gradients of <output, fixed random tensor> to every input and parameter), float32 (TF32 off)
and bfloat16 (bf16 inputs for the ops, `torch.autocast` for the blocks). Error = max |kernel - portable| / max
|portable| per tensor, the largest over outputs and gradients; tolerance 2e-3 (float32) and 6e-2 (bf16).
(b) train: each task's `micro` preset, 20 optimizer steps, `--precision bf16-mixed --logger none` through
`train.run` in this process (built-in demo data, checkpoints in a temporary folder): every step's loss finite, and
the mean of the last 5 below the mean of the first 5.
(c) speed (bf16 autocast, CUDA-event timing, median of 10 after 3 warm-ups): the mixers fwd+bwd at batch 16,
d_model 192, L = 197 and 1024, ours (kernel path and portable path) against mamba-ssm's fused `Mamba` / `Mamba2`;
whole networks at 224 px, batch 64, inference and training step (forward + backward), images/s against their timm
peers (demansia2_tiny vs deit_tiny, vmamba_tiny_v0 vs convnext_tiny).
Exit status 1 when an op is out of tolerance or a training fails (no finite, falling loss).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

NO_CUDA = "gpu_check: no CUDA device on this machine; nothing checked (run it where torch.cuda.is_available())."
TOL = {torch.float32: 2e-3, torch.bfloat16: 6e-2}
TASKS = ("demansia2", "agegender", "face", "hand", "palm")
PORTABLE_ENV = "MAMBA_ZOO_PORTABLE"


# -- helpers (CPU-testable) ---------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (both taken in float32); 0 for two all-zero tensors."""
    a, ref = a.detach().float(), ref.detach().float()
    scale = ref.abs().max().item()
    diff = (a - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def loss_falls(losses: list[float], k: int = 5) -> tuple[bool, bool]:
    """(every loss finite, mean of the last k < mean of the first k)."""
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    falls = finite and len(losses) >= 2 * k and statistics.fmean(losses[-k:]) < statistics.fmean(losses[:k])
    return finite, falls


@contextlib.contextmanager
def portable_path(on: bool = True):
    """Force (or not) the portable twins for ops called inside the block."""
    old = os.environ.get(PORTABLE_ENV)
    os.environ[PORTABLE_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[PORTABLE_ENV]
        else:
            os.environ[PORTABLE_ENV] = old


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# -- (a) ops ------------------------------------------------------------------------------------------------------
def _fwd_bwd(fn: Callable, inputs: dict[str, torch.Tensor], params: list[torch.Tensor], seed: int):
    """Outputs of fn(**inputs) and the gradients of <outputs, fixed random tensors> to inputs and params."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad] + params
    for t in leaves:
        t.grad = None
    out = fn(**inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    outs = [o for o in outs if isinstance(o, torch.Tensor)]
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, device=o.device, generator=gen)).sum() for o in outs)
    loss.backward()
    grads = [t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return [o.detach().clone() for o in outs], grads


def compare(fn: Callable, make_inputs: Callable[[], dict], params: list[torch.Tensor] = (),
            autocast: torch.dtype | None = None, kernel_path: Callable = lambda: portable_path(False)
            ) -> tuple[float, float]:
    """(forward error, backward error) of the kernel path against the portable path on the same inputs.

    `kernel_path`: the context the kernel half runs in (tests pass `route_kernels` with mamba-ssm's references)."""
    inputs = make_inputs()
    device = next(iter(inputs.values())).device.type
    runs = []
    for ctx_path in (kernel_path, portable_path):
        ctx = torch.autocast(device, dtype=autocast) if autocast else contextlib.nullcontext()
        with ctx_path(), ctx:
            runs.append(_fwd_bwd(fn, inputs, list(params), seed=1))
    (ko, kg), (po, pg) = runs
    return max(rel_err(a, b) for a, b in zip(ko, po)), max([rel_err(a, b) for a, b in zip(kg, pg)] or [0.0])


def op_cases(dev: torch.device, dtype: torch.dtype, blocks: bool = True) -> dict[str, tuple]:
    """name -> (fn, make_inputs, params, autocast dtype) for every op and (`blocks`) block."""
    from models.blocks.bidirectional import BidirectionalMamba2
    from models.blocks.mamba import Mamba
    from models.blocks.mamba2 import Mamba2
    from models.blocks.ops.causal_conv import causal_conv1d_fn
    from models.blocks.ops.rms_norm import gated_rms_norm, rms_norm
    from models.blocks.ops.selective_scan import selective_scan_fn
    from models.blocks.ops.ssd import mamba_chunk_scan_combined
    from models.blocks.ss2d import SS2D

    b, L, d, n = 2, 197, 128, 16
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dt=dtype, scale=1.0, grad=True, negative=False):
        t = torch.randn(*shape, generator=g) * scale
        t = -(t.abs() + 0.1) if negative else t
        return t.to(dev, dt).requires_grad_(grad)

    f32 = torch.float32
    cases = {
        "selective_scan_fn": (
            lambda **k: selective_scan_fn(**k, delta_softplus=True),
            lambda: dict(u=rnd(b, d, L), delta=rnd(b, d, L, scale=0.5), A=rnd(d, n, dt=f32, negative=True),
                         B=rnd(b, n, L), C=rnd(b, n, L), D=rnd(d, dt=f32), z=rnd(b, d, L),
                         delta_bias=rnd(d, dt=f32, scale=0.1)), (), None),
        "mamba_chunk_scan_combined": (
            lambda **k: mamba_chunk_scan_combined(**k, chunk_size=64, dt_softplus=True),
            lambda: dict(x=rnd(b, L, 8, 32), dt=rnd(b, L, 8, scale=0.5), A=rnd(8, dt=f32, negative=True),
                         B=rnd(b, L, 2, 64), C=rnd(b, L, 2, 64), D=rnd(8, dt=f32),
                         z=rnd(b, L, 8, 32), dt_bias=rnd(8, dt=f32, scale=0.1)), (), None),
        "causal_conv1d_fn": (
            lambda **k: causal_conv1d_fn(**k, activation="silu"),
            lambda: dict(x=rnd(b, d, L), weight=rnd(d, 4, scale=0.5), bias=rnd(d)), (), None),
        "rms_norm (+ residual)": (
            lambda **k: rms_norm(**k, bias=None, eps=1e-5, prenorm=True),
            lambda: dict(x=rnd(b, L, d), weight=rnd(d, dt=f32), residual=rnd(b, L, d)), (), None),
        "gated_rms_norm": (
            lambda **k: gated_rms_norm(**k, bias=None, eps=1e-5, group_size=d // 2, norm_before_gate=False),
            lambda: dict(x=rnd(b * L, d), weight=rnd(d, dt=f32), z=rnd(b * L, d)), (), None),
    }
    if not blocks:
        return cases
    torch.manual_seed(0)
    modules = {
        "SS2D": (SS2D(96), (b, 14, 14, 96)),
        "Mamba (mamba_inner_fn)": (Mamba(96), (b, L, 96)),
        "Mamba2 (split_conv1d_scan)": (Mamba2(96, d_state=64, headdim=32), (b, L, 96)),
        "BidirectionalMamba2": (BidirectionalMamba2(96, d_state=64, headdim=32, use_mem_eff_path=False), (b, L, 96)),
    }
    for name, (mod, shape) in modules.items():
        mod = mod.to(dev)
        cases[name] = (lambda mod=mod, **k: mod(k["x"]), lambda shape=shape: dict(x=rnd(*shape, dt=f32)),
                       list(mod.parameters()), None if dtype == f32 else dtype)
    return cases


def check_ops(dev: torch.device) -> tuple[str, bool]:
    rows, ok = [], True
    for dtype in (torch.float32, torch.bfloat16):
        for name, (fn, make, params, autocast) in op_cases(dev, dtype).items():
            try:
                ef, eb = compare(fn, make, params, autocast)
                good = ef <= TOL[dtype] and eb <= TOL[dtype]
                rows.append([name, str(dtype).removeprefix("torch."), f"{ef:.1e}", f"{eb:.1e}", "ok" if good else
                             f"OVER {TOL[dtype]:.0e}"])
            except Exception as err:  # report and go on: one broken op must not hide the others
                good = False
                rows.append([name, str(dtype).removeprefix("torch."), "-", "-", f"FAILED {type(err).__name__}: "
                             f"{str(err).splitlines()[0][:120] if str(err) else ''}"])
                traceback.print_exc()
            ok &= good
    return markdown(["op / block", "dtype", "fwd rel err", "bwd rel err", "verdict"], rows), ok


# -- (b) bf16 training --------------------------------------------------------------------------------------------
def train_tasks(steps: int = 20) -> tuple[str, bool]:
    import lightning as L

    class Losses(L.Callback):
        def __init__(self):
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self.values.append(float(loss.detach().float()))

    import train

    rows, ok = [], True
    for task in TASKS:
        rec, t0 = Losses(), time.perf_counter()
        try:
            train.run(["--model", task, "--preset", "micro", "--precision", "bf16-mixed", "--logger", "none",
                       "--progress", "none", "--max-steps", str(steps), "--epochs", "1000",
                       "--limit-val-batches", "1", "--run-name", f"gpu-check-{task}"], extra_callbacks=[rec])
            finite, falls = loss_falls(rec.values)
            verdict = "ok" if finite and falls else ("NOT FINITE" if not finite else "NOT FALLING")
        except Exception as err:
            finite = falls = False
            verdict = f"FAILED {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
            traceback.print_exc()
        ok &= finite and falls
        v = rec.values
        rows.append([task, len(v), f"{statistics.fmean(v[:5]):.4g}" if v else "-",
                     f"{statistics.fmean(v[-5:]):.4g}" if v else "-", f"{time.perf_counter() - t0:.0f}", verdict])
    return markdown(["task (micro, bf16-mixed)", "steps", "mean loss, first 5", "mean loss, last 5", "s", "verdict"],
                    rows), ok


# -- (c) speed ----------------------------------------------------------------------------------------------------
def cuda_ms(fn: Callable, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _bf16(fn: Callable) -> Callable:
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn()
    return run


def speed(dev: torch.device) -> str:
    import timm
    from mamba_ssm.modules.mamba2 import Mamba2 as RefMamba2
    from mamba_ssm.modules.mamba_simple import Mamba as RefMamba

    import models  # noqa: F401  (registers the zoo's timm names)
    from models.blocks.bidirectional import BidirectionalMamba2
    from models.blocks.mamba import Mamba
    from models.blocks.mamba2 import Mamba2

    d, m2 = 192, dict(d_state=128, headdim=48)
    mixers = {
        "Mamba-1": (lambda: RefMamba(d), lambda: Mamba(d)),
        "Mamba-2": (lambda: RefMamba2(d, **m2), lambda: Mamba2(d, **m2)),
        "Bidirectional Mamba-2": (None, lambda: BidirectionalMamba2(d, **m2)),
    }
    rows = []
    for name, (make_ref, make_ours) in mixers.items():
        for length in (197, 1024):
            x = torch.randn(16, length, d, device=dev, requires_grad=True)

            def fb(m, x=x):
                def step():
                    m(x).float().sum().backward()
                return _bf16(step)

            times = {}
            if make_ref is not None:
                torch.manual_seed(0)
                times["mamba-ssm"] = cuda_ms(fb(make_ref().to(dev)))
            torch.manual_seed(0)
            ours = make_ours().to(dev)
            times["ours"] = cuda_ms(fb(ours))
            with portable_path():
                times["ours, portable"] = cuda_ms(fb(ours))
            ref = times.get("mamba-ssm")
            for impl, ms in times.items():
                rows.append([name, impl, length, f"{ms:.2f}", f"{ref / ms:.2f}x" if ref else "-"])
    mixer_table = markdown(["mixer (fwd+bwd, batch 16, d 192, bf16 autocast)", "impl", "L", "ms", "vs mamba-ssm"],
                           rows)

    nets = {"demansia2_tiny": ("deit_tiny_patch16_224", True), "vmamba_tiny_v0": ("convnext_tiny", False)}
    rows, x = [], torch.randn(64, 3, 224, 224, device=dev)
    for net, (peer, _) in nets.items():
        res = {}
        for name in (net, peer):
            torch.manual_seed(0)
            m = timm.create_model(name, pretrained=False).to(dev)

            def infer(m=m):
                m.eval()
                with torch.inference_mode():
                    m(x)

            def step(m=m):
                m.train()
                m.zero_grad(set_to_none=True)
                out = m(x)
                (out[0] if isinstance(out, tuple) else out).float().sum().backward()

            res[name] = (64e3 / cuda_ms(_bf16(infer)), 64e3 / cuda_ms(_bf16(step)))
            del m
            torch.cuda.empty_cache()
        (inf, tr), (pinf, ptr) = res[net], res[peer]
        rows.append([net, f"{inf:.0f}", f"{tr:.0f}", peer, f"{pinf:.0f}", f"{ptr:.0f}", f"{inf / pinf:.2f}",
                     f"{tr / ptr:.2f}"])
    net_table = markdown(["network (224 px, batch 64, bf16 autocast)", "inf img/s", "train img/s", "peer",
                          "peer inf img/s", "peer train img/s", "inf x", "train x"], rows)
    return mixer_table + "\n\n" + net_table


# -- main ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["ops", "train", "speed"], default=["ops", "train", "speed"])
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"),
                        help="markdown file the tables are appended to ('none': print only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    from models.blocks.ops.dispatch import kernels_available

    if not kernels_available():
        print("gpu_check: CUDA is here but mamba-ssm's / causal-conv1d's kernels do not load (see the warning above); "
              "install them (setup.sh) and run again.")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.environ.setdefault("ZOO_CHECKPOINT_DIR", tempfile.mkdtemp(prefix="gpu_check_"))
    dev = torch.device("cuda")
    import mamba_ssm

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"## GPU check ({stamp}): {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, mamba-ssm {getattr(mamba_ssm, '__version__', '?')}\n\n"
            f"`python benchmarks/gpu_check.py --parts {' '.join(args.parts)}`")
    sections, ok, t_all = [head], True, time.perf_counter()
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "ops":
            table, good = check_ops(dev)
            sections.append("Kernel path vs portable path, max relative error (tolerance float32 2e-3, bf16 6e-2):\n\n"
                            + table)
            ok &= good
        elif part == "train":
            table, good = train_tasks()
            sections.append("Each task's micro preset, 20 steps, --precision bf16-mixed:\n\n" + table)
            ok &= good
        else:
            sections.append("Speed:\n\n" + speed(dev))
        print(f"[gpu_check] {part}: {time.perf_counter() - t0:.0f} s", flush=True)
    sections.append(f"Total {time.perf_counter() - t_all:.0f} s; verdict: {'all ok' if ok else 'FAILURES above'}.")
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.results != "none":
        with open(args.results, "a") as f:
            f.write("\n" + text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
