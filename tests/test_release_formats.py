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
                      "--limit-val-batches", "0", "--batch-size", "4", "--set", "encoder=micro", "--set", "num_workers=0", "--set",
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
    import predict

    for model in (load_model(tmp_path / "zoo.ckpt"), predict.open_model(str(src))):  # converted, or as released
        assert model.cfg.depth == 2 and model.cfg.scan_mode == "legacy" and model.cfg.d_model == 192
        for k, v in state.items():
            assert torch.equal(model.net.state_dict()[k], v), k
    assert not marker.exists()


def _write_png(path, seed: int = 0, size: int = 64):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_hand_best_pth_opens_with_its_heads(tmp_path, capsys):
    """The hand project's `best.pth` (train.py: `torch.save(model.state_dict())` of FullyConnectedNetwork, SUM's
    encoder and decoder under `sum_model.salu_mamba.`, heads fc/bn _1 identity, _2 age, _3 gender), written here for a
    micro encoder at 64 px: predict.py opens it; its logits equal upstream's head arithmetic on the same features."""
    import torch.nn.functional as F

    import predict
    from models.hand.model import VMambaV0

    torch.manual_seed(0)
    enc = VMambaV0(16, (1, 1, 1, 1), 8).eval()
    sd = {f"sum_model.salu_mamba.{k}": v for k, v in _v0_names(enc.state_dict()).items() if not k.startswith("norm.")}
    sd["sum_model.salu_mamba.layers_up.0.blocks.0.ln_1.weight"] = torch.ones(128)  # SUM's decoder: never run
    sd["sum_model.salu_mamba.final_conv.weight"] = torch.ones(1, 24, 1, 1)
    flat = 2 * 2 * 128
    for k, n in ((1, 9), (2, 6), (3, 2)):  # 9 subjects, as the 11k Hands fixture below
        for i, (a, b) in enumerate(((flat, 512), (512, 256), (256, n))):
            sd[f"fc{i + 1}_{k}.weight"], sd[f"fc{i + 1}_{k}.bias"] = torch.randn(b, a) * a**-0.5, torch.randn(b)
            if i < 2:
                sd |= {f"bn{i + 1}_{k}.weight": 1 + torch.rand(b), f"bn{i + 1}_{k}.bias": torch.randn(b),
                       f"bn{i + 1}_{k}.running_mean": torch.randn(b), f"bn{i + 1}_{k}.running_var": 1 + torch.rand(b),
                       f"bn{i + 1}_{k}.num_batches_tracked": torch.tensor(70)}
    path = tmp_path / "best.pth"
    torch.save(sd, path)

    model = predict.open_model(str(path))
    assert model.cfg.head == "published" and model.cfg.encoder == "micro" and model.cfg.image_size == 64
    assert model.cfg.pretrained is False  # the file holds the whole network: no encoder release to fetch
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        h = torch.sigmoid(enc.stages(x)[0][-1]).flatten(1)
        for k, name in ((1, "identity"), (2, "age"), (3, "gender")):
            y = h
            for i in (1, 2):
                y = F.linear(y, sd[f"fc{i}_{k}.weight"], sd[f"fc{i}_{k}.bias"])
                y = F.relu(F.batch_norm(y, sd[f"bn{i}_{k}.running_mean"], sd[f"bn{i}_{k}.running_var"],
                                        sd[f"bn{i}_{k}.weight"], sd[f"bn{i}_{k}.bias"], eps=1e-5))
            torch.testing.assert_close(out[name], F.linear(y, sd[f"fc3_{k}.weight"], sd[f"fc3_{k}.bias"]))
    image = _write_png(tmp_path / "hand.png")
    capsys.readouterr()
    assert predict.main(["--ckpt", str(path), "identify", "--top-k", "2", str(image)]) == 0
    printed = capsys.readouterr()
    assert "hand.png" in printed.out and "released format" in printed.err, printed
    from test_hand_data import write_fixture

    root = write_fixture(tmp_path / "11k", n_subjects=9, per_aspect=5)
    assert predict.main(["--ckpt", str(path), "evaluate", str(root), "--set", "aspects=dorsal right", "--set",
                         "gallery_draws=1", "--json"]) == 0
    assert "identity_acc" in capsys.readouterr().out


def test_ddpm_trainer_checkpoint_opens_as_palm_with_ema_weights(tmp_path):
    """denoising-diffusion-pytorch's `Trainer.save` format ({step, model, opt, ema, scaler, version}): predict.py
    opens it as a palm model whose sampler uses the EMA weights, and `generate` writes images."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    import predict

    torch.manual_seed(0)
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2, 4, 8)), image_size=128, timesteps=20,
                                  objective="pred_noise", beta_schedule="sigmoid")
    ema = EMA(diffusion, beta=0.995, update_every=10)
    with torch.no_grad():
        for p in ema.ema_model.parameters():
            p.add_(0.01)
    ema.initted.fill_(True)
    opt = torch.optim.Adam(diffusion.parameters(), lr=2e-5, betas=(0.9, 0.99))
    path = tmp_path / "model-88.pt"
    torch.save({"step": 44_000, "model": diffusion.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                "scaler": None, "version": "2.1.1"}, path)

    model = predict.open_model(str(path))
    cfg = model.cfg
    assert (cfg.unet_dim, tuple(cfg.dim_mults), cfg.timesteps) == (8, (1, 2, 4, 8), 20)
    assert (cfg.objective, cfg.beta_schedule, cfg.image_size, cfg.mixer) == ("pred_noise", "sigmoid", 128, "attention")
    for k, v in ema.ema_model.state_dict().items():
        assert torch.equal(model.ema_diffusion.state_dict()[k], v), k
    assert torch.equal(model.net.state_dict()["model.init_conv.weight"], diffusion.model.init_conv.weight)
    out = tmp_path / "gen"
    assert predict.main(["--ckpt", str(path), "generate", "--individuals", "1", "--per-individual", "1", "--out",
                         str(out), "--steps", "1"]) == 0
    assert len(list(out.rglob("*.png"))) == 1


def test_timm_model_safetensors_reads_as_weights(tmp_path):
    """A timm / Hugging Face `model.safetensors` (no pickle at all) is read by the same reader."""
    import timm
    from safetensors.torch import save_file

    from zoo.checkpoint import read_state_dict

    net = timm.create_model("test_resnet", num_classes=3)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    state = read_state_dict(tmp_path / "model.safetensors")
    other = timm.create_model("test_resnet", num_classes=3)
    other.load_state_dict(state)
    for k, v in net.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
