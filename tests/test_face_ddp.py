"""Face validation under DDP: each rank embeds its own block of the split, the rows are gathered across ranks before
retrieval metrics and threshold calibration, and the training samplers shard by rank. Two real gloo processes on
the CPU (torch.multiprocessing) must give the 1-process metrics exactly."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.pk_sampler import PKBatchSampler
from datamodules.samplers import EpochShuffleSampler, RankShardSampler
from models.face.metrics import retrieval_metrics
from models.face.module import all_gather_stacked, gather_rows
from zoo.verification import calibrate_threshold

ROOT = Path(__file__).resolve().parent.parent
N, CLASSES, DIM = 37, 6, 8  # 37: the two ranks' blocks differ in length (19 + 18)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, CLASSES, (N,), generator=g)
    centres = torch.nn.functional.normalize(torch.randn(CLASSES, DIM, generator=g), dim=1)
    emb = torch.nn.functional.normalize(centres[labels] + 0.6 * torch.randn(N, DIM, generator=g), dim=1)
    return emb, labels


def _metrics(emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    out = {k: float(v) for k, v in retrieval_metrics(emb, labels).items()}
    out["threshold"], out["pair_balanced_acc"] = (float(x) for x in calibrate_threshold(emb, labels))
    return out


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        emb, labels = _data()
        mine = list(RankShardSampler(N))  # world and rank from torch.distributed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            emb_all, labels_all = gather_rows([emb[mine], labels[mine]], all_gather_stacked, world)
        pk = PKBatchSampler(labels.tolist(), batch_size=4, k=2, seed=3)
        shuffle = EpochShuffleSampler(range(N), seed=5)
        torch.save({"metrics": _metrics(emb_all, labels_all), "rows": emb_all, "mine": mine,
                    "warnings": [str(w.message) for w in caught],
                    "pk": list(pk), "shuffle": list(shuffle)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes (torch.multiprocessing spawn: each imports the zoo)
def test_two_gloo_ranks_give_the_single_process_metrics(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    emb, labels = _data()
    single = _metrics(emb, labels)

    assert r0["mine"] == list(range(19)) and r1["mine"] == list(range(19, N))
    assert torch.equal(r0["rows"], emb) and torch.equal(r1["rows"], emb)
    assert r0["warnings"] == r1["warnings"] == []  # e.g. no deprecated torch.distributed.nn all_gather
    assert r0["metrics"] == single and r1["metrics"] == single, (r0["metrics"], single)
    assert 0 < single["rank1"] < 1  # the data is neither trivial nor random

    # P x K: the ranks split the same epoch of batches between them (every other batch), none shared
    global_batches = list(PKBatchSampler(labels.tolist(), batch_size=4, k=2, seed=3, num_replicas=1, rank=0))
    assert len(r0["pk"]) == len(r1["pk"]) == len(global_batches) // 2
    both = PKBatchSampler(labels.tolist(), batch_size=4, k=2, seed=3, num_replicas=2, rank=0)._epoch_batches
    assert r0["pk"] == both()
    assert not {tuple(b) for b in r0["pk"]} & {tuple(b) for b in r1["pk"]}
    for batch in r0["pk"] + r1["pk"]:
        assert len({int(labels[i]) for i in batch}) == 2  # P = 4 // K distinct labels, K = 2 images each

    # the training shuffle: one permutation of every index, split between the ranks
    assert len(r0["shuffle"]) == len(r1["shuffle"]) == 19
    assert set(r0["shuffle"]) | set(r1["shuffle"]) == set(range(N))


def test_single_process_is_unchanged():
    emb, labels = _data()
    assert list(RankShardSampler(N)) == list(range(N))
    assert gather_rows([emb, labels], None, 1)[0] is emb
    shuffle = EpochShuffleSampler(range(N), seed=5)
    g = torch.Generator().manual_seed(5 * 1_000_003 + 0)
    assert list(shuffle) == torch.randperm(N, generator=g).tolist()
    assert len(PKBatchSampler(labels.tolist(), batch_size=4, k=2, seed=3)) == N // 4


@pytest.mark.slow  # two train.py processes (the only run of Lightning's DDP launcher in the suite)
def test_a_two_process_ddp_run_is_as_quiet_as_one_process_and_keeps_one_run_folder(tmp_path):
    """`--devices 2 --strategy ddp` on the CPU (gloo): the run's lines are printed once, Lightning asks nothing of the
    epoch logs (no `sync_dist` or deprecated `all_gather` warnings), and the second process writes into the run
    folder of the first instead of making its own."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               ZOO_CHECKPOINT_DIR=str(tmp_path / "ckpt"), ZOO_DEMO_DIR=str(tmp_path / "demo"))
    env.pop("ZOO_RUN_DIR", None)
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "face", "--preset", "micro",
                          "--devices", "2", "--strategy", "ddp", "--epochs", "2", "--limit-train-batches", "2",
                          "--limit-val-batches", "1", "--logger", "csv", "--progress", "none",
                          "--set", "image_size=32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "All distributed processes registered. Starting with 2 processes" in out.stderr  # really two ranks
    assert out.stdout.count("[train] face, preset micro") == 1, out.stdout
    assert out.stdout.count("[train] checkpoints in") == 1, out.stdout
    for noise in ("sync_dist", "all_gather", "Warning", "warn("):
        assert noise not in out.stderr, out.stderr
    runs = list((tmp_path / "ckpt" / "face").iterdir())
    assert len(runs) == 1, runs
    assert (runs[0] / "last.ckpt").is_file()
    # one row of epoch metrics per validation, as in a single-process run
    import csv

    rows = [r for r in csv.DictReader(open(next(runs[0].rglob("metrics.csv")))) if r.get("val/rank1")]
    assert len(rows) == 2, rows
