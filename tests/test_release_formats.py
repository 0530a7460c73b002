"""Every upstream release format loads without trust and runs no code from the file: each test writes a file in the
release's exact layout with the foreign classes of a throwaway module (tests/foreign_release.py) that writes a marker
if it is imported or any of its code runs; the marker never appears, one line names the classes stood in for, and
the weights arrive where they belong. A control shows the marker is real (full pickle, --trust-checkpoint, runs it).
"""
from __future__ import annotations

import re

import pytest
import torch
from foreign_release import foreign_modules, vmamba_v0_release

import train
from zoo.checkpoint import safe_load
from zoo.safe_load import Inert

STOOD_IN = "inert placeholders stand in for"


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "RAN"


def _v0_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our VMamba v0 encoder's keys in VMamba v0's own names (block `ln_1`, `self_attention`)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"(blocks\.\d+\.)norm\.", r"\1ln_1.", k)
        out[re.sub(r"(blocks\.\d+\.)mixer\.", r"\1self_attention.", k)] = v
    return out


@pytest.fixture
def v0_release(tmp_path, marker):
    """A VMamba v0 release file for the hand micro encoder: `model` and `model_ema` differ (ema = model + 1)."""
    from models.hand.module import HandBiometrics

    torch.manual_seed(0)
    own = HandBiometrics(config=None).net.encoder.state_dict()
    model = {k: torch.randn_like(v) for k, v in own.items()}
    model = {**_v0_names(model), "head.weight": torch.randn(1000, 128), "head.bias": torch.randn(1000)}
    ema = {k: v + 1 for k, v in model.items()}
    with foreign_modules(tmp_path, marker) as classes:
        path = vmamba_v0_release(tmp_path / "vssmtiny_dp01_ckpt_epoch_292.pth", model, ema, classes)
    assert not marker.exists()
    return path, model, ema


def test_the_marker_is_real(tmp_path, marker):
    """Control: full pickle of such a file with the throwaway module importable runs its code."""
    with foreign_modules(tmp_path, marker) as classes:
        path = vmamba_v0_release(tmp_path / "v0.pth", {"w": torch.zeros(1)}, {"w": torch.ones(1)}, classes)
        marker.unlink(missing_ok=True)
        safe_load(path, trust=True)
        assert marker.exists()


def test_v0_release_reads_as_data_even_with_its_module_importable(tmp_path, marker, capsys):
    """The stand-in `yacs.config` stays on sys.path while the zoo reads: the reader still never imports it."""
    with foreign_modules(tmp_path, marker) as classes:
        path = vmamba_v0_release(tmp_path / "v0.pth", {"w": torch.zeros(1)}, {"w": torch.ones(1)}, classes)
        for name in [m for m in list(__import__("sys").modules) if m.startswith("yacs")]:
            del __import__("sys").modules[name]
        marker.unlink(missing_ok=True)
        ckpt = safe_load(path)
        assert not marker.exists()
    cfg = ckpt["config"]
    assert isinstance(cfg, Inert) and cfg.foreign == "yacs.config.CfgNode"
    assert cfg["MODEL"]["NAME"] == "vssm_tiny" and cfg.state == {"__immutable__": True}
    assert ckpt["epoch"] == 292 and ckpt["max_accuracy"] == 82.2 and torch.equal(ckpt["model_ema"]["w"], torch.ones(1))
    err = capsys.readouterr().err
    assert err.count(STOOD_IN) == 1 and "yacs.config.CfgNode" in err


def _hand_run(path, *extra):
    return train.run(["--model", "hand", "--logger", "none", "--progress", "none", "--max-steps", "1",
                      "--limit-val-batches", "1", "--batch-size", "8", "--set", "num_workers=0", "--set",
                      "image_size=32", "--set", "aspects=dorsal right", "--set", "freeze_encoder_epochs=-1",
                      "--set", f"pretrained_ckpt={path}", *extra])


@pytest.mark.parametrize("ema", [False, True], ids=["model", "model_ema"])
def test_v0_release_through_pretrained_ckpt_without_trust(v0_release, marker, ema, capsys):
    """`--set pretrained_ckpt=FILE` (no trust flag) on the released format: the frozen encoder holds the file's
    `model` weights, or `model_ema` with `--set pretrained_ema=true`."""
    path, model, model_ema = v0_release
    out = _hand_run(path, *(["--set", "pretrained_ema=true"] if ema else []))
    assert not marker.exists()
    err, stdout = capsys.readouterr()[::-1]
    assert err.count(STOOD_IN) == 1 and "yacs.config.CfgNode" in err
    assert "0 encoder key(s) not loaded" in stdout, stdout
    expected = _v0_names(model_ema if ema else model)
    got = _v0_names(out["model"].net.encoder.state_dict())
    assert got.keys() <= expected.keys()
    for k, v in got.items():
        assert torch.equal(v, expected[k]), k


def test_demansia2_lightning_release_with_foreign_hparams(tmp_path, marker, capsys):
    """"DeMansia 2 Tiny EMA.ckpt" as Lightning writes it, its hyper-parameters an AttributeDict and its callback
    state holding an upstream config object and a payload: converts with no trust flag, nothing runs."""
    from test_demansia2_convert import released_state_dict

    from models.demansia2 import convert
    from zoo.checkpoint import load_model

    state = released_state_dict(depth=2, attn=(1,))
    with foreign_modules(tmp_path, marker) as classes:
        hp = classes.AttributeDict(img_size=(224, 224), patch_size=(16, 16), depth=2, d_model=192, num_classes=1000,
                                   ssm_cfg={"headdim": 48}, attn_layer_idx=(1,), device="cuda",
                                   attn_cfg={"d_conv": 4, "head_dim": 96, "num_heads": 3, "rotary_emb_dim": 48},
                                   dtype=torch.float32)
        src = tmp_path / "DeMansia 2 Tiny EMA.ckpt"
        torch.save({"epoch": 299, "global_step": 375_000, "pytorch-lightning_version": "2.3.0", "state_dict": state,
                    "loops": {"fit_loop": {"state_dict": {}}},
                    "callbacks": {"EMA": {"ema_weights": list(state.values()),
                                          "config": classes.TrainConfig(decay=0.9999)}, "hook": classes.Payload()},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99),
                                                                         "params": list(range(3))}]}],
                    "lr_schedulers": [{"last_epoch": 299, "base_lrs": [1e-4]}], "hparams_name": "kwargs",
                    "hyper_parameters": hp}, src)
    assert convert.main([str(src), str(tmp_path / "zoo.ckpt")]) == 0
    assert not marker.exists()
    err = capsys.readouterr().err
    assert err.count(STOOD_IN) == 1
    for name in ("lightning_standin.parsing.AttributeDict", "upstream_train.config.TrainConfig",
                 "upstream_train.config.ran"):
        assert name in err, err
    model = load_model(tmp_path / "zoo.ckpt")
    assert model.cfg.depth == 2 and model.cfg.scan_mode == "legacy" and model.cfg.d_model == 192
    for k, v in state.items():
        assert torch.equal(model.model.state_dict()[k], v), k
