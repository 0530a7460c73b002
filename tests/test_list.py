"""`train.py --list` answers from a parameter-count cache keyed by the model code, without importing torch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = ("import sys, train; train.run(['--list']); "
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')")


def run_list(cache: Path) -> str:
    env = {**os.environ, "ZOO_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow  # a fresh Python process (imports torch, Lightning, timm: ~5 s before the test starts)
def test_list_counts_once_then_answers_without_torch(tmp_path):
    first = run_list(tmp_path)
    assert "TORCH_IMPORTED" in first and (tmp_path / "param_counts.json").is_file()
    second = run_list(tmp_path)
    assert second.endswith("NO_TORCH\n")
    assert first.replace("TORCH_IMPORTED", "") == second.replace("NO_TORCH", "")  # the same table
    assert "tiny 9.51M" in second  # DeMansia 2 Tiny, the published count


def test_a_changed_model_file_invalidates_the_cache(tmp_path, monkeypatch):
    import zoo.summary

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    key = zoo.summary.code_hash()
    fake = tmp_path / "model_config.py"
    fake.write_text((ROOT / "model_config.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(zoo.summary, "ROOT", tmp_path)
    (tmp_path / "models").mkdir()
    assert zoo.summary.code_hash() != key
