"""One vocabulary, and old checkpoints keep opening: config fields and values renamed since a checkpoint was written
are read under their new names with a notice, unknown fields are named instead of dropped silently, and weights saved
under an attribute's old name (`model.`, `backbone.`, `diffusion.`, `loss_fn.`, `metric_loss.`) load under the new
one (zoo/config_renames.py, docs/conventions.md)."""
from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys

import pytest
import torch

from model_config import REGISTRY, ZOO_TIMM_NAMES, FaceConfig, HandConfig
from zoo.checkpoint import model_from_checkpoint
from zoo.config_renames import FIELD_RENAMES, STATE_RENAMES, VALUE_RENAMES
from zoo.errors import ZooError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {e.config.__name__: e.config for e in REGISTRY.values()}
READY = sorted(n for n, e in REGISTRY.items() if e.status == "ready")


def test_the_table_maps_old_names_to_fields_that_exist():
    for cls_name, fields in FIELD_RENAMES.items():
        cls = CONFIGS[cls_name]
        names = set(cls.field_names())
        for old, new in fields.items():
            assert new in names and old not in names, (cls_name, old, new)
    for cls_name, fields in VALUE_RENAMES.items():
        assert set(fields) <= set(CONFIGS[cls_name].field_names()), cls_name
    assert set(STATE_RENAMES) <= set(REGISTRY)


def test_a_checkpoint_config_with_old_names_opens_with_the_new_ones(capsys):
    old = {"loss": "arcface", "num_classes": 7, "early_stop_patience": 3, "backbone": "mamba",
           "monitor": "val/precision_at_1", "epochs": 2}
    cfg = FaceConfig.from_dict(old, strict=False, where="face checkpoint config")
    assert (cfg.metric_loss, cfg.num_identities, cfg.early_stopping_patience, cfg.backbone, cfg.monitor, cfg.epochs) \
        == ("arcface", 7, 3, "own", "val/rank1", 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("notice: face checkpoint config: ") for line in err), err
    for words in ("'loss' is now 'metric_loss'", "'num_classes' is now 'num_identities'",
                  "'early_stop_patience' is now 'early_stopping_patience'", "backbone=mamba is now backbone=own",
                  "monitor=val/precision_at_1 is now monitor=val/rank1"):
        assert any(words in line for line in err), (words, err)


def test_an_unknown_checkpoint_field_is_named_in_one_notice(capsys):
    cfg = FaceConfig.from_dict({"epochs": 3, "colour_jitter": 0.4}, strict=False, where="x.ckpt")
    assert cfg.epochs == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.ckpt" in err[0] and "'colour_jitter'" in err[0] and "FaceConfig" in err[0], err
    with pytest.raises(ZooError, match="colour_jitter"):  # strict (presets, --set): still an error
        FaceConfig.from_dict({"colour_jitter": 0.4})


def test_old_names_on_the_command_line_are_accepted_with_a_notice(capsys):
    cfg = FaceConfig.from_presets("micro").with_overrides(["early_stop_patience=4", "loss=cosface", "backbone=mamba"])
    assert (cfg.early_stopping_patience, cfg.metric_loss, cfg.backbone) == (4, "cosface", "own")
    err = capsys.readouterr().err
    assert "--set early_stop_patience: the field is now 'early_stopping_patience'" in err
    assert "--set loss: the field is now 'metric_loss'" in err and "backbone=mamba is now backbone=own" in err
    with pytest.raises(ZooError, match="early_stopping_patience"):  # an unknown key still suggests the field
        FaceConfig.from_presets("micro").with_overrides(["early_stoping_patience=4"])


@pytest.mark.parametrize("task", READY)
def test_weights_saved_under_old_attribute_names_load(task, capsys):
    """A checkpoint written before the network became `net` and the loss `criterion` opens with every tensor."""
    entry = REGISTRY[task]
    cls = entry.load("module")
    extra = {"face": {"metric_loss": "arcface", "num_identities": 4}}.get(task, {})  # a loss with weights
    model = cls(config=entry.config.from_presets("micro").replace(**extra))
    state = model.state_dict()
    renames = STATE_RENAMES.get(task, {})
    old_state = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.startswith(new):
                key = old + key[len(new):]
                break
        old_state[key] = value.clone()
    if renames:
        assert set(old_state) != set(state), "the renamed attribute holds no tensor in the micro preset"
    ckpt = {"state_dict": old_state, "hyper_parameters": {"task": task, "config": model.cfg.to_dict()}}
    loaded = model_from_checkpoint(ckpt, "old.ckpt")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_face_checkpoint_of_the_old_vocabulary_opens_whole(capsys):
    """Old field names and old weight names together: the loss weights (ArcFace) come back under `criterion`."""
    from models.face.module import FaceEmbedder

    cfg = FaceConfig.from_presets("micro").replace(metric_loss="arcface", num_identities=5)
    model = FaceEmbedder(config=cfg)
    config = {("loss" if k == "metric_loss" else "num_classes" if k == "num_identities" else k): v
              for k, v in dataclasses.asdict(cfg).items()}
    config["backbone"] = "mamba"
    state = {("loss_fn." + k[len("criterion."):] if k.startswith("criterion.") else k): v.clone()
             for k, v in model.state_dict().items()}
    assert any(k.startswith("loss_fn.") for k in state)
    loaded = model_from_checkpoint({"state_dict": state, "hyper_parameters": {"task": "face", "config": config}})
    assert loaded.cfg == cfg
    torch.testing.assert_close(loaded.criterion.loss.W, model.criterion.loss.W)
    assert "'loss' is now 'metric_loss'" in capsys.readouterr().err
    assert FaceEmbedder(config=cfg, loss="triplet").cfg.metric_loss == "triplet"  # an old keyword overrides too


def test_zoo_imports_no_application_file():
    """The framework never imports model_config.py or models/, at module level or inside a function."""
    for path in sorted((ROOT / "zoo").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("model_config", "models"), (path.name, name)


def test_the_zoo_timm_names_the_configs_know_are_the_registered_ones():
    import models

    assert ZOO_TIMM_NAMES == models.TIMM_NAMES


@pytest.mark.slow  # a fresh Python process (imports torch, Lightning, timm: ~5 s before the test starts)
def test_a_backbone_name_is_checked_without_building_a_network():
    """HandConfig validates a timm backbone by name: no Lightning, no task package, no network."""
    code = ("import sys, model_config\n"
            "model_config.HandConfig(backbone='resnet18')\n"
            "model_config.HandConfig(backbone='vmamba_tiny_v0')\n"
            "try:\n    model_config.HandConfig(backbone='resnet10tt')\n"
            "except Exception as e:\n    print(e)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'models')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stderr
    assert "Unknown backbone 'resnet10tt'" in lines[0] and "resnet10t" in lines[0] and "backbone" in lines[0]
    assert lines[-1] == "[]", lines[-1]
    with pytest.raises(ZooError, match="pretrained_ckpt"):
        HandConfig(backbone="resnet18", pretrained_ckpt="v0.pth")
