"""CPU speed and memory of the sequence mixers: ours vs mamba-ssm's reference path vs mambapy's parallel scan.

    python benchmarks/scan.py                                 # L = 197, 1024, 4096; 3 repeats
    python benchmarks/scan.py --lengths 197 --repeats 10
    python benchmarks/scan.py --threads 1 --clock cpu      # process CPU time: robust when the machine is shared

One process, 2 threads (torch.set_num_threads(2); --threads), float32, batch 4, d_model 192. Per mixer and length: forward
(under torch.no_grad) and forward+backward (sum of the output, backward to the input and all parameters), the
median wall time over --repeats runs after one warm-up, the speed-up against the reference of the same family
measured in the same process, and the peak memory of one forward+backward: the rise of the process's peak RSS
(Linux VmHWM, reset through /proc/self/clear_refs after glibc's malloc_trim), in MiB.

Mixers: Mamba-1 (models.blocks.mamba.Mamba, d_state 16, expand 2), Vim-style BidirectionalMamba, Mamba-2
(models.blocks.mamba2.Mamba2, d_state 128, headdim 48) and BidirectionalMamba2.
References ("ref"): mamba-ssm's own modules on their pure-PyTorch path (the CUDA extensions stubbed as in
tests/conftest.py; Mamba-1: slow path with `selective_scan_ref`; Mamba-2: use_mem_eff_path=False with
`ssd_minimal_discrete` as the chunk scan and the reference gated RMSNorm); for the bidirectional mixers, the average
of two such modules run on the sequence and on its reverse. mambapy ("mambapy"): `mambapy.mamba.MambaBlock` and the
bidirectional `mambapy.vim.VMambaBlock`, both with `pscan` (mambapy has no pure-PyTorch Mamba-2).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

BATCH, D_MODEL = 4, 192
MAMBA2 = dict(d_state=128, headdim=48)


# -- references -------------------------------------------------------------------------------------------------
def mamba_ssm_refs():
    """mamba-ssm's modules pointed at their pure-PyTorch references (no CUDA, no Triton)."""
    from conftest import _import_mamba_ssm_refs
    from test_blocks_support import ssd_minimal_scan

    ref = _import_mamba_ssm_refs()
    m1 = sys.modules["mamba_ssm.modules.mamba_simple"]
    m2 = sys.modules["mamba_ssm.modules.mamba2"]
    m1.selective_scan_fn = ref.selective_scan_ref
    m1.selective_state_update = None
    m2.mamba_chunk_scan_combined = ssd_minimal_scan(ref.ssd_minimal_discrete)
    ref.layernorm_gated.rmsnorm_fn = ref.gated_rms_norm_ref
    return ref


class TwoWay(nn.Module):
    """Reference bidirectional mixer: the average of one module on x and another on reversed x."""

    def __init__(self, make):
        super().__init__()
        self.fwd, self.bwd = make(), make()

    def forward(self, x):
        return (self.fwd(x) + self.bwd(x.flip(1)).flip(1)) / 2


def build_mixers(ref):
    from mambapy.mamba import MambaBlock, MambaConfig
    from mambapy.vim import MambaConfig as VimConfig
    from mambapy.vim import VMambaBlock

    from models.blocks.bidirectional import BidirectionalMamba2
    from models.blocks.mamba import Mamba
    from models.blocks.mamba2 import Mamba2
    from models.blocks.vim import BidirectionalMamba

    return {
        "Mamba-1": {
            "ref": lambda: ref.Mamba(D_MODEL, use_fast_path=False),
            "ours": lambda: Mamba(D_MODEL),
            "mambapy": lambda: MambaBlock(MambaConfig(d_model=D_MODEL, n_layers=1, pscan=True)),
        },
        "Bidirectional Mamba-1 (Vim)": {
            "ref": lambda: TwoWay(lambda: ref.Mamba(D_MODEL, use_fast_path=False)),
            "ours": lambda: BidirectionalMamba(D_MODEL),
            "mambapy": lambda: VMambaBlock(VimConfig(d_model=D_MODEL, n_layers=1, pscan=True, bidirectional=True)),
        },
        "Mamba-2": {
            "ref": lambda: ref.Mamba2(D_MODEL, **MAMBA2, use_mem_eff_path=False),
            "ours": lambda: Mamba2(D_MODEL, **MAMBA2),
        },
        "Bidirectional Mamba-2": {
            "ref": lambda: TwoWay(lambda: ref.Mamba2(D_MODEL, **MAMBA2, use_mem_eff_path=False)),
            "ours": lambda: BidirectionalMamba2(D_MODEL, **MAMBA2),
        },
    }


# -- measurement ------------------------------------------------------------------------------------------------
_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_mib(fn) -> float:
    """Rise of the peak resident set size while `fn` runs (Linux only; nan elsewhere)."""
    if _libc is None:
        return float("nan")
    gc.collect()
    _libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


CLOCK = time.perf_counter


def median_ms(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times) * 1e3


def measure(module: nn.Module, length: int, repeats: int, slow: bool) -> tuple[float, float, float]:
    """(forward ms, forward+backward ms, peak MiB of one forward+backward). `slow`: one run each, no warm-up (the
    references take minutes at long lengths)."""
    x = torch.randn(BATCH, length, D_MODEL, requires_grad=True)

    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        module(x).sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    if slow:
        times = []
        mem = peak_rss_mib(lambda: times.append(median_ms(fwd_bwd, 1, warmup=False)))
        return median_ms(fwd, 1, warmup=False), times[0], mem
    return median_ms(fwd, repeats), median_ms(fwd_bwd, repeats), peak_rss_mib(fwd_bwd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[197, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=None, help="subset of: m1 bi1 m2 bi2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time, robust on a loaded machine (use with --threads 1)")
    parser.add_argument("--ref-max-length", type=int, default=1024,
                        help="skip the references above this length (mamba-ssm's reference backward grows ~L^2: "
                             "~2 min at L=1024 on one thread)")
    parser.add_argument("--m2-d-state", type=int, default=MAMBA2["d_state"], help="Mamba-2 d_state")
    parser.add_argument("--m2-headdim", type=int, default=MAMBA2["headdim"], help="Mamba-2 headdim")
    parser.add_argument("--m2-chunk", type=int, default=256, help="Mamba-2 chunk_size")
    args = parser.parse_args()
    MAMBA2.update(d_state=args.m2_d_state, headdim=args.m2_headdim, chunk_size=args.m2_chunk)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    mixers = build_mixers(mamba_ssm_refs())  # (importing tests/conftest.py sets 2 threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keys = dict(zip(("m1", "bi1", "m2", "bi2"), mixers))
    families = [keys[f] for f in args.families] if args.families else list(mixers)

    header = ("| mixer | impl | L | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up | peak MiB |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|")
    print(f"B={BATCH}, d_model={D_MODEL}, float32, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"{args.clock} clock, repeats={args.repeats}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          "speed-up = reference time / this time")
    print(header, flush=True)
    for family in families:
        for length in args.lengths:
            results = {}
            for impl, make in mixers[family].items():
                if impl == "ref" and args.ref_max_length and length > args.ref_max_length:
                    continue
                torch.manual_seed(0)
                module = make()
                results[impl] = measure(module, length, args.repeats, slow=impl == "ref" and length > 256)
                del module
                gc.collect()
            ref = results.get("ref")
            for impl, (f_ms, fb_ms, mem) in results.items():
                up_f = f"{ref[0] / f_ms:.1f}x" if ref else "-"
                up_fb = f"{ref[1] / fb_ms:.1f}x" if ref else "-"
                print(f"| {family} | {impl} | {length} | {f_ms:.1f} | {fb_ms:.1f} | {up_f} | {up_fb} | {mem:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
