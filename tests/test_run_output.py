"""What a train.py run prints and leaves on disk (subprocess runs of the test-only toy task through tests/crash.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test is a train.py process (imports torch, Lightning, timm: ~5 s each)
ROOT = Path(__file__).resolve().parent.parent
NOISE = ["GPU available", "TPU available", "litlogger", "set_vital", "LeafSpec", "exists and is not empty",
         "weights_only` was not set", "Traceback"]


def _train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ZOO_CHECKPOINT_DIR=str(tmp_path / "ck"), ZOO_DEMO_DIR=str(tmp_path / "demo"),
               COLUMNS="80", TTY_COMPATIBLE="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(ROOT / "tests" / "crash.py"), "--", "--model", "toy", "--logger",
                           "none", *args], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_run_prints_what_matters_only(tmp_path):
    out = _train(tmp_path, "--epochs", "2", "--run-name", "a")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for noise in NOISE:
        assert noise not in text, f"{noise!r} printed:\n{text[-3000:]}"
    assert text.count("[train] checkpoints in") == 1
    # the rich bar: one finished line per epoch, each within 80 columns
    import re

    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.stdout)
    finals = [seg for line in plain.splitlines() for seg in line.split("\r") if "12/12" in seg and "Epoch" in seg]
    assert finals and all(len(seg.rstrip()) <= 80 for seg in finals)


def test_fast_dev_run_writes_no_checkpoint(tmp_path):
    out = _train(tmp_path, "--fast-dev-run", "--progress", "tqdm")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list((tmp_path / "ck").rglob("*.ckpt")) and not list((tmp_path / "ck").rglob("config.json"))


def test_training_set_smaller_than_a_batch_is_an_error(tmp_path):
    out = _train(tmp_path, "--batch-size", "500", "--run-name", "big", "--progress", "none")
    assert out.returncode == 2
    assert "96 item(s), fewer than one batch of 500" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "ck" / "toy" / "big").exists()  # a failed run leaves no empty run folder
