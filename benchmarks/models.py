"""Whole-model CPU speed: every zoo network beside the model a user would pick instead, one process, one table.

    python benchmarks/models.py                                  # every row, 224 and 512, 3 repeats
    python benchmarks/models.py --models demansia2_tiny --sizes 224 --repeats 5
    python benchmarks/models.py --no-train --sizes 224 512 1024  # inference only (batch 1 at 1024)
    python benchmarks/models.py --threads 1 --clock cpu          # process CPU time: robust on a shared machine
    python benchmarks/models.py --models demansia2_tiny --sizes 224 --compile     # + a torch.compile'd row
    python benchmarks/models.py --models demansia2_tiny --sizes 224 --profile infer  # top ops by self CPU time

Per image size, every network of the selected rows and their peers is measured in turn, round after round
(interleaved, so a change in the machine's load hits all of them alike), and the best round is kept: inference
(`torch.inference_mode`, eval mode) and a training step (train mode, forward, `sum().backward()` to every
parameter, no optimizer) on a random batch (--batch, default 4; batch 1 from 1024 px). Random weights, float32,
--threads threads (default 2).

Columns: parameters; FLOPs per image (`torch.utils.flop_counter`, forward, multiply-add = 2 FLOPs; elementwise work is
not counted); images/s; achieved GFLOP/s (forward FLOPs x images/s, for training x3: forward + backward); the peak
memory of one training step (rise of the process's peak RSS, see benchmarks/scan.py); and ratios against the row's
peer measured in the same rounds. A row is (name, factory(image_size) -> module, peer name, image sizes it takes):
add the hand and palm networks to ROWS as their peers land.

--compile adds, beside each selected row, `<row> (compiled)`: the same network after `nn.Module.compile` (inductor,
as `train.py --compile`), measured in the same rounds after its warm-up; the time of its first inference and first
training step (compilation included) is printed under the table. --profile infer|train measures nothing else:
torch.profiler over --repeats calls after a warm-up, one table per row and size of the top ops by self CPU time
with their share of the total (shares hold under load, where absolute times do not).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scan import peak_rss_mib  # noqa: E402  (benchmarks/scan.py)


def timm_model(name: str, sized: bool) -> Callable[[int], nn.Module]:
    """A factory for timm's `name` (zoo names need `import models`); `sized`: pass img_size (ViTs, Mamba nets)."""

    def make(size: int) -> nn.Module:
        import timm

        import models  # noqa: F401  (registers the zoo's timm names)

        return timm.create_model(name, pretrained=False, **({"img_size": size} if sized else {}))

    return make


@dataclass(frozen=True)
class Row:
    name: str
    factory: Callable[[int], nn.Module]
    peer: str
    sizes: tuple[int, ...]  # image sizes the network takes


class Denoiser(nn.Module):
    """A diffusion U-Net `(x, t) -> prediction` as an image model: a fixed mid-chain timestep for every image."""

    def __init__(self, unet: nn.Module, t: int = 500):
        super().__init__()
        self.unet, self.t = unet, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x, torch.full((x.shape[0],), self.t, dtype=torch.long))


def palm_unet(preset: str, mixer: str) -> Callable[[int], nn.Module]:
    """The palm task's denoiser at `preset` (`mixer="attention"`: the library's published Unet at the same size)."""

    def make(size: int) -> nn.Module:
        from model_config import PalmConfig
        from models.palm.model import build_unet

        return Denoiser(build_unet(PalmConfig.from_presets(preset).replace(image_size=size, mixer=mixer)))

    return make


# Peers, by name: the models a user would pick instead.
PEERS: dict[str, Callable[[int], nn.Module]] = {
    "deit_tiny_patch16_224": timm_model("deit_tiny_patch16_224", sized=True),
    "mambaout_femto": timm_model("mambaout_femto", sized=False),
    "resnet18": timm_model("resnet18", sized=False),
    "convnext_tiny": timm_model("convnext_tiny", sized=False),
    "resnet50": timm_model("resnet50", sized=False),
    "palm Unet, library attention (tiny)": palm_unet("tiny", "attention"),
}
ROWS: list[Row] = [
    Row("deit_tiny_patch16_224", PEERS["deit_tiny_patch16_224"], "deit_tiny_patch16_224", (224, 512, 1024)),
    Row("demansia2_tiny", timm_model("demansia2_tiny", sized=True), "deit_tiny_patch16_224", (224, 512, 1024)),
    Row("face_mamba_tiny", timm_model("face_mamba_tiny", sized=True), "deit_tiny_patch16_224", (112, 224)),
    Row("efficientnet_b0 (agegender default)", timm_model("efficientnet_b0", sized=False), "resnet18",
        (224, 512, 1024)),
    Row("vmamba_tiny_v0 (hand encoder)", timm_model("vmamba_tiny_v0", sized=False), "convnext_tiny", (224, 512)),
    Row("resnet50", PEERS["resnet50"], "convnext_tiny", (224, 512)),
    Row("palm Unet + VSS (tiny)", palm_unet("tiny", "vss"), "palm Unet, library attention (tiny)", (64, 128)),
    Row("mambaout_femto", PEERS["mambaout_femto"], "deit_tiny_patch16_224", (224, 512, 1024)),
    Row("resnet18", PEERS["resnet18"], "deit_tiny_patch16_224", (224, 512, 1024)),
]


def flops_per_image(model: nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


CLOCK = time.perf_counter


def _infer(model: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        t = CLOCK()
        model(x)
        return CLOCK() - t


def _train_step(model: nn.Module, x: torch.Tensor) -> float:
    model.train()
    model.zero_grad(set_to_none=True)
    t = CLOCK()
    out = model(x)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    return CLOCK() - t


COMPILED = " (compiled)"


def measure_size(names: list[str], factories: dict[str, Callable], size: int, batch: int, repeats: int,
                 train: bool) -> dict[str, dict[str, float]]:
    """Interleaved best-of-`repeats` measurements of every network in `names` at one image size; a name ending in
    COMPILED is its base network compiled (FLOPs counted eager: the counter would compile a batch-1 graph)."""
    torch.manual_seed(0)
    nets = {n: factories[n.removesuffix(COMPILED)](size) for n in names}
    x = torch.randn(batch, 3, size, size)
    res = {n: {"params": sum(p.numel() for p in m.parameters()), "flops": flops_per_image(m, size),
               "inf": float("inf"), "train": float("inf"), "mem": float("nan")} for n, m in nets.items()}
    for n, m in nets.items():  # warm-up (first-call allocations, oneDNN primitive caches; compilation)
        if n.endswith(COMPILED):
            m.compile()
            res[n]["compile_inf"] = _infer(m, x)
            res[n]["compile_train"] = _train_step(m, x) if train else float("nan")
        _infer(m, x)
        if train:
            res[n]["mem"] = peak_rss_mib(lambda m=m: _train_step(m, x))
    for _ in range(repeats):
        for n, m in nets.items():
            res[n]["inf"] = min(res[n]["inf"], _infer(m, x))
            if train:
                res[n]["train"] = min(res[n]["train"], _train_step(m, x))
    for r in res.values():
        r["inf_ips"] = batch / r["inf"]
        r["train_ips"] = batch / r["train"] if train else float("nan")
    return res


def profile_size(name: str, factory: Callable, size: int, batch: int, repeats: int, train: bool,
                 top: int) -> str:
    """A markdown table of the `top` ops by self CPU time over `repeats` inference calls or training steps of one
    network, after one warm-up call (torch.profiler, CPU activities; shares of the total self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model, x = factory(size), torch.randn(batch, 3, size, size)
    step = (lambda: _train_step(model, x)) if train else (lambda: _infer(model, x))
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = [f"{name}, {'training step' if train else 'inference'}, {size} px, batch {batch}, {repeats} "
             f"call(s) profiled: {total / 1e3 / repeats:.0f} ms self CPU time per call",
             "", "| op | self CPU ms per call | share | calls per call |", "|---|---:|---:|---:|"]
    for e in events[:top]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / repeats:.1f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count / repeats:.0f} |")
    rest = sum(e.self_cpu_time_total for e in events[top:])
    lines.append(f"| {len(events) - top} other ops | {rest / 1e3 / repeats:.1f} | {100 * rest / total:.1f}% | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="row names (default: all)")
    parser.add_argument("--sizes", nargs="*", type=int, default=[224, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-train", action="store_true", help="inference only")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (with --threads 1, immune to other processes' load)")
    parser.add_argument("--compile", action="store_true", help="also measure each selected row compiled "
                        "(torch.compile, inductor), beside it in the same rounds")
    parser.add_argument("--profile", choices=["infer", "train"], help="profile the selected rows (not their "
                        "peers) instead: top ops by self CPU time over --repeats calls")
    parser.add_argument("--top", type=int, default=15, help="ops listed per --profile table")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    rows = [r for r in ROWS if not args.models or r.name in args.models]
    if not rows:
        parser.error(f"no row called {args.models}; rows: {[r.name for r in ROWS]}")
    factories = {**PEERS, **{r.name: r.factory for r in rows}}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.profile:
        print(f"torch {torch.__version__}, threads={args.threads}, float32, load average {load:.1f} on "
              f"{os.cpu_count()} CPUs\n")
        for size in args.sizes:
            for r in rows:
                if size in r.sizes:
                    print(profile_size(r.name, r.factory, size, 1 if size >= 1024 else args.batch, args.repeats,
                                       args.profile == "train", args.top) + "\n", flush=True)
        return
    if args.compile:
        rows = [v for r in rows for v in (r, Row(r.name + COMPILED, r.factory, r.peer, r.sizes))]
    print(f"torch {torch.__version__}, threads={args.threads}, float32, batch {args.batch} (1 from 1024 px), "
          f"best of {args.repeats} interleaved rounds, {args.clock} clock, load average {load:.1f} on "
          f"{os.cpu_count()} CPUs\n")
    print("| model | px | params M | GFLOPs/img | inf img/s | train img/s | inf GFLOP/s | train GFLOP/s | "
          "peak MiB | peer | inf x | train x | GFLOP/s x |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    compiled: dict[tuple[str, int], dict[str, float]] = {}
    for size in args.sizes:
        sized = [r for r in rows if size in r.sizes]
        if not sized:
            continue
        names = list(dict.fromkeys([n for r in sized for n in (r.peer, r.name)]))
        res = measure_size(names, factories, size, 1 if size >= 1024 else args.batch, args.repeats,
                           not args.no_train)
        for r in sized:
            m, p = res[r.name], res[r.peer]
            gf = m["flops"] / 1e9
            print(f"| {r.name} | {size} | {m['params'] / 1e6:.1f} | {gf:.2f} | {m['inf_ips']:.2f} | "
                  f"{m['train_ips']:.2f} | {gf * m['inf_ips']:.1f} | {3 * gf * m['train_ips']:.1f} | "
                  f"{m['mem']:.0f} | {r.peer} | {m['inf_ips'] / p['inf_ips']:.2f} | "
                  f"{m['train_ips'] / p['train_ips']:.2f} | "
                  f"{(m['flops'] * m['inf_ips']) / (p['flops'] * p['inf_ips']):.2f} |", flush=True)
        compiled.update({(r.name, size): res[r.name] for r in sized if r.name.endswith(COMPILED)})
    for (name, size), m in compiled.items():
        print(f"\n{name} at {size} px: first inference {m['compile_inf']:.1f} s, first training step "
              f"{m['compile_train']:.1f} s (compilation included; {args.clock} clock)")


if __name__ == "__main__":
    main()
