"""Weights files from elsewhere cannot ask for unbounded memory: a file's config passes the same checks as the command
line (with upper bounds on the fields that size memory), the network is first built on the meta device and compared
with the file's tensor shapes before anything is allocated; a raw pickle given as --ckpt is "not a checkpoint"."""
from __future__ import annotations

import json
import pickle
import resource
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import predict
from model_config import HandConfig
from models.hand.module import HandBiometrics
from zoo.checkpoint import META_CONFIG, load_model, save_safetensors


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    torch.manual_seed(0)
    model = HandBiometrics(HandConfig.from_presets("micro"))
    path = tmp_path_factory.mktemp("bounded") / "hand.safetensors"
    save_safetensors(model, path)
    return path


def crafted(honest, out, **changes):
    """The honest file's tensors with its embedded config edited."""
    with safe_open(str(honest), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta[META_CONFIG] = json.dumps({**json.loads(meta[META_CONFIG]), **changes})
    save_file(state, str(out), metadata=meta)
    return out


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def test_the_honest_export_opens(honest):
    assert load_model(honest).cfg.embedding_dim == HandConfig.from_presets("micro").embedding_dim


@pytest.mark.parametrize("dim", [10**6, 10**9])
def test_a_config_asking_for_a_huge_embedding_is_refused_before_building(honest, tmp_path, capsys, dim):
    bad = crafted(honest, tmp_path / "bad.safetensors", embedding_dim=dim)
    before, t = peak_mib(), time.perf_counter()
    assert predict.main(["--ckpt", str(bad), "--help"]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - t < 5 and peak_mib() - before < 200  # today: 1.7 GB more at 10**6
    assert err.count("\n") == 1 and str(bad) in err and f"embedding_dim={dim}" in err and "<=" in err


def test_a_config_that_does_not_fit_the_tensors_is_refused_on_the_meta_device(honest, tmp_path, capsys, monkeypatch):
    bad = crafted(honest, tmp_path / "wide.safetensors", embedding_dim=4096)  # within bounds, not the file's
    built = []
    real_hook = HandBiometrics.on_load_checkpoint

    def spy(self, checkpoint):  # runs on every model built from a file, before its weights are loaded
        built.append(next(self.net.parameters()).device.type)
        return real_hook(self, checkpoint)

    monkeypatch.setattr(HandBiometrics, "on_load_checkpoint", spy)
    assert predict.main(["--ckpt", str(bad), "--help"]) == 2
    err = capsys.readouterr().err
    assert built == ["meta"]  # never built for real
    assert "(4096" in err and "shape" in err and str(bad) in err and err.count("\n") == 1


@pytest.mark.parametrize("payload", [{"state_dict": {"w": 1}}, [1, 2, 3]])
def test_a_raw_pickle_is_not_a_checkpoint(tmp_path, capsys, payload):
    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps(payload))
    assert predict.main(["--ckpt", str(path), "--help"]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint" in err and "corrupt" not in err and err.count("\n") == 1 and str(path) in err


def test_a_resume_checkpoint_whose_config_does_not_fit_its_tensors_builds_nothing(honest, tmp_path, capsys,
                                                                                 monkeypatch):
    import train

    with safe_open(str(honest), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = {**json.loads(meta[META_CONFIG]), "embedding_dim": 4096}
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"task": "hand", "config": config}, "epoch": 0,
                "global_step": 1}, path)
    built = []
    real_hook = HandBiometrics.on_load_checkpoint

    def spy(self, checkpoint):
        built.append(next(self.net.parameters()).device.type)
        return real_hook(self, checkpoint)

    monkeypatch.setattr(HandBiometrics, "on_load_checkpoint", spy)
    assert train.main(["--model", "hand", "--resume", str(path), "--logger", "none", "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert built == ["meta"]
    assert "(4096" in err and "shape" in err and str(path) in err and err.count("\n") == 1


def test_class_weights_of_the_metric_loss_are_not_allocated_either(honest, tmp_path, capsys):
    # within every bound, but 200k identities x 1024 dims would be 0.8 GB of ArcFace weights (pytorch-metric-learning
    # allocates them with a constructor that ignores the meta device)
    bad = crafted(honest, tmp_path / "ids.safetensors", num_identities=200_000, embedding_dim=1024)
    before = peak_mib()
    assert predict.main(["--ckpt", str(bad), "--help"]) == 2
    err = capsys.readouterr().err
    assert peak_mib() - before < 200 and "shape" in err and err.count("\n") == 1
