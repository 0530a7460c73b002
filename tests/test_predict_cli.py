"""predict.py: a verb the checkpoint's task lacks names the task and its verbs; a missing checkpoint's message speaks
to predict.py users; every task offers `export --format safetensors`, and the export predicts exactly as the
checkpoint does."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import predict
import train


@pytest.fixture(scope="module")
def demansia2_ckpt(tmp_path_factory):
    import zoo.trainer

    root, old = tmp_path_factory.mktemp("predict-cli"), zoo.trainer.CHECKPOINT_ROOT
    zoo.trainer.CHECKPOINT_ROOT = root
    try:
        out = train.run(["--model", "demansia2", "--max-steps", "1", "--limit-val-batches", "1", "--logger", "none",
                         "--progress", "none", "--run-name", "p", "--batch-size", "4", "--set", "num_workers=0"])
    finally:
        zoo.trainer.CHECKPOINT_ROOT = old
    return out["run_dir"] / "last.ckpt"


def _image(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)).save(path)
    return path


def test_a_verb_of_another_task_names_the_task_and_its_verbs(demansia2_ckpt, capsys):
    assert predict.main(["--ckpt", str(demansia2_ckpt), "compare", "a.jpg", "b.jpg"]) == 2
    err = capsys.readouterr().err
    assert "'compare' is not a command of the 'demansia2' task" in err and str(demansia2_ckpt) in err
    assert "classify" in err and "export" in err and "Traceback" not in err


def test_a_missing_checkpoint_does_not_suggest_resume(tmp_path, capsys):
    assert predict.main(["--ckpt", str(tmp_path / "nope.ckpt"), "classify", "x.jpg"]) == 2
    err = capsys.readouterr().err
    assert "Checkpoint not found" in err and str(tmp_path / "nope.ckpt") in err
    assert "--resume" not in err and "train.py" in err


def test_help_lists_the_generic_export(demansia2_ckpt, capsys):
    with pytest.raises(SystemExit) as exit_:
        predict.main(["--ckpt", str(demansia2_ckpt), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "classify" in out and "export" in out and "--trust-checkpoint" in out


def test_safetensors_export_classifies_exactly_like_the_checkpoint(demansia2_ckpt, tmp_path, capsys):
    img = _image(tmp_path / "a.png")
    st = tmp_path / "m.safetensors"
    assert predict.main(["--ckpt", str(demansia2_ckpt), "export", "--format", "safetensors", "--out", str(st)]) == 0
    assert st.is_file() and "wrote" in capsys.readouterr().out
    results = []
    for ckpt in (demansia2_ckpt, st):
        assert predict.main(["--ckpt", str(ckpt), "classify", str(img), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and results[0][0]["top"]


def test_a_foreign_safetensors_file_is_explained(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    assert predict.main(["--ckpt", str(path), "--help"]) == 2
    assert "not exported by this zoo" in capsys.readouterr().err
