"""Every registered model, driven by the registry (like timm's test_models.py): a model registered tomorrow is built,
trained one step at every preset, checkpointed and reopened the moment it is registered."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import train
from model_config import REGISTRY
from zoo.checkpoint import load_model

READY = sorted(name for name, e in REGISTRY.items() if e.status == "ready")
# The micro presets build in the inner loop (`-m "not slow"`); the full-size ones (up to 44M weights) in the full suite.
PRESETS = [pytest.param(name, preset, id=f"{name}-{preset}", marks=() if preset == "micro" else pytest.mark.slow)
           for name in READY for preset in REGISTRY[name].config.PRESETS]
SMALL_IMAGE = 32  # where a preset trains at a larger size, the test trains at this one (every architecture allows it)


def small_overrides(name: str, preset: str) -> list[str]:
    """Flags that keep one step of any preset cheap without changing its network: small images, batch 2, no
    pretrained download, no loader workers (the resume tests cover workers)."""
    cfg = REGISTRY[name].config.from_presets(preset)
    fields = {f.name for f in dataclasses.fields(cfg)}
    out = ["--batch-size", "2", "--set", "num_workers=0"]
    size = getattr(cfg, "image_size", None)
    if size is None or size > SMALL_IMAGE:
        out += ["--set", f"image_size={SMALL_IMAGE}"]
    if "pretrained" in fields:
        out += ["--set", "pretrained=false"]
    return out


def test_registry_has_every_task_of_the_design():
    assert {"demansia2", "agegender", "face", "hand", "palm"} <= set(REGISTRY)
    for entry in REGISTRY.values():
        assert entry.config.DEFAULT_PRESET in entry.config.PRESETS
        assert "published" in entry.config.PRESETS, f"{entry.name} has no published preset"


@pytest.mark.parametrize("name,preset", PRESETS)
def test_every_preset_builds_and_trains_one_step(name, preset):
    out = train.run(["--model", name, "--preset", preset, "--fast-dev-run", "--logger", "none", "--progress", "none",
                     *small_overrides(name, preset)])
    trainer, model = out["trainer"], out["model"]
    assert trainer.state.finished and trainer.global_step >= 1
    assert model.hparams["task"] == name
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", READY)
def test_checkpoint_round_trip_and_load_from_checkpoint(name, tmp_path, monkeypatch):
    import zoo.trainer

    monkeypatch.setattr(zoo.trainer, "CHECKPOINT_ROOT", tmp_path)
    preset = REGISTRY[name].config.DEFAULT_PRESET
    out = train.run(["--model", name, "--max-steps", "2", "--limit-val-batches", "1", "--logger", "none",
                     "--progress", "none", "--run-name", "rt", *small_overrides(name, preset)])
    path = out["run_dir"] / "last.ckpt"
    assert path.is_file()
    trained = out["model"].cpu()
    cls = REGISTRY[name].load("module")
    for reopened in (cls.load_from_checkpoint(str(path), map_location="cpu"), load_model(path)):
        assert type(reopened) is cls and reopened.cfg == trained.cfg
        got, want = reopened.state_dict(), trained.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k].cpu(), want[k].cpu()), k


@pytest.mark.parametrize("name", READY)
def test_describe_data_prints_the_split_sizes_as_json(name, capsys):
    import json

    assert train.main(["--model", name, "--describe-data", "--json", "--set", "num_workers=0"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"train", "val", "test"} <= set(info)
    assert all(isinstance(info[k], int) for k in ("train", "val", "test"))
    assert info["train"] > 0 and info["val"] > 0
