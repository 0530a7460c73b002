#!/usr/bin/env python
"""Training speed of the small presets against a size-matched CNN: images per second of one optimizer step
(forward, cross-entropy, backward, AdamW), rounds interleaved in one process, ratio to timm `test_resnet`.

    python benchmarks/small_presets.py [--batch 32] [--rounds 5] [--threads 2]

Rows: DeMansia 2 `micro` and variants of it (fewer tokens, no attention layer, shallower), the face `micro` encoder,
and `test_resnet` (0.37M parameters), all at 64x64 px. On a shared machine run it twice: the ratios are what counts.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402,F401 - registers the zoo's timm names
from model_config import DeMansia2Config, FaceConfig  # noqa: E402


def demansia2(**changes) -> nn.Module:
    from models.demansia2.model import DeMansia2Net, net_kwargs

    return DeMansia2Net(**net_kwargs(DeMansia2Config.from_presets("micro").replace(**changes)))


def face(**changes) -> nn.Module:
    from models.face.model import FaceEmbeddingNet

    cfg = FaceConfig.from_presets("micro").replace(**changes)
    return nn.Sequential(FaceEmbeddingNet(cfg).encoder, nn.Linear(cfg.d_model, 10))


ROWS = {
    "timm test_resnet": lambda: timm.create_model("test_resnet", num_classes=10),
    "demansia2 micro (64 tokens, attn at 2)": lambda: demansia2(),
    "demansia2 micro, 16 tokens (patch_size 8)": lambda: demansia2(patch_size=8),
    "demansia2 micro, no attention layer": lambda: demansia2(attn_layers=()),
    "demansia2 micro, depth 2 (attn at 1)": lambda: demansia2(depth=2, attn_layers=(1,)),
    "face micro encoder (64 tokens)": lambda: face(),
    "face micro encoder, unidirectional": lambda: face(bidirectional=False),
}


def step_seconds(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    t = time.perf_counter()
    loss = F.cross_entropy(net(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per row and round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="row names to keep (substring match)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [n for n in ROWS if not args.only or any(s in n for s in args.only)]
    if "timm test_resnet" not in names:
        names.insert(0, "timm test_resnet")
    nets = {n: ROWS[n]() for n in names}
    opts = {n: torch.optim.AdamW(nets[n].parameters(), lr=1e-4) for n in names}
    x, y = torch.randn(args.batch, 3, 64, 64), torch.randint(0, 10, (args.batch,))
    for n in names:  # warm-up step (allocations, lazy inits)
        step_seconds(nets[n], opts[n], x, y)
    best = {n: float("inf") for n in names}
    for _ in range(args.rounds):
        for n in names:
            best[n] = min(best[n], min(step_seconds(nets[n], opts[n], x, y) for _ in range(args.steps)))
    base = best["timm test_resnet"]
    print(f"\ntrain step, batch {args.batch} at 64x64, {args.threads} threads, best of {args.rounds} rounds x "
          f"{args.steps} steps\n")
    print("| model | params | img/s | step time vs test_resnet |")
    print("|---|---|---|---|")
    for n in names:
        params = sum(q.numel() for q in nets[n].parameters()) / 1e6
        print(f"| {n} | {params:.2f}M | {args.batch / best[n]:.0f} | {best[n] / base:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
