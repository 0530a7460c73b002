"""`pretrained=true` for the zoo's own networks (zoo/pretrained.py), offline: the cache folder filled by the test with
files in the release format. The raw release is converted on first use and cached as safetensors; a second build
reads the cache; offline without either, one line names the URL, the file name and the folder, exit 2."""
from __future__ import annotations

import hashlib

import pytest
import timm
import torch
from test_demansia2_convert import released_checkpoint, released_state_dict

import train
from models.demansia2.model import RELEASE_PRESET
from zoo.errors import ZooError
from zoo.pretrained import release_info


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "zoo-cache"
    monkeypatch.setenv("MAMBA_ZOO_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


@pytest.fixture(scope="module")
def tiny_state():
    return released_state_dict(seed=3)


def test_offline_without_cache_is_one_line_naming_url_file_and_folder(cache, capsys):
    with pytest.raises(ZooError) as e:
        timm.create_model("demansia2_tiny", pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and str(cache) in msg and "'DeMansia 2 Tiny EMA.ckpt'" in msg
    assert "https://archive.org/download/DeMansia-2/DeMansia%202%20Tiny%20EMA.ckpt" in msg
    status = train.main(["--model", "demansia2", "--logger", "none", "--progress", "none", "--max-steps", "1",
                         "--set", "num_workers=0", "--set", "pretrained=true"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and "'DeMansia 2 Tiny EMA.ckpt'" in err and str(cache) in err, err


def test_demansia2_tiny_released_weights_from_the_cache(cache, tiny_state, capsys):
    cache.mkdir(parents=True)
    released_checkpoint(cache / "DeMansia 2 Tiny EMA.ckpt", tiny_state)
    model = timm.create_model("demansia2_tiny", pretrained=True)
    for k, v in tiny_state.items():
        assert torch.equal(model.state_dict()[k], v), k
    cached = cache / "demansia2_tiny.safetensors"
    assert cached.is_file() and "cached as" in capsys.readouterr().err
    (cache / "DeMansia 2 Tiny EMA.ckpt").unlink()  # the second build reads the converted cache only
    again = timm.create_model("demansia2_tiny", pretrained=True, num_classes=10)
    for k, v in tiny_state.items():
        if not k.startswith(("head.", "aux_head.")):
            assert torch.equal(again.state_dict()[k], v), k
    assert again.head.weight.shape == (10, 192)


def test_set_pretrained_true_on_demansia2(cache, tiny_state):
    from model_config import DeMansia2Config
    from models.demansia2 import DeMansia2

    cache.mkdir(parents=True)
    released_checkpoint(cache / "DeMansia 2 Tiny EMA.ckpt", tiny_state)
    module = DeMansia2(config=DeMansia2Config.from_presets(RELEASE_PRESET).replace(pretrained=True))
    module.setup("fit")
    for k, v in tiny_state.items():
        assert torch.equal(module.net.state_dict()[k], v), k
    micro = DeMansia2(config=DeMansia2Config.from_presets("micro").replace(pretrained=True))
    with pytest.raises(ZooError, match=f"--preset {RELEASE_PRESET}"):
        micro.setup("fit")


def test_vmamba_tiny_v0_release_checked_by_sha256(cache, monkeypatch, tmp_path):
    from foreign_release import foreign_modules, vmamba_v0_release
    from test_hand_model import v0_state_dict

    from models.vmamba import convert as vmamba_convert
    from models.vmamba import model as vmamba_model

    sd = v0_state_dict((2, 2, 9, 2))
    cache.mkdir(parents=True)
    marker = tmp_path / "RAN"
    with foreign_modules(tmp_path, marker) as classes:
        raw = vmamba_v0_release(cache / "vssmtiny_dp01_ckpt_epoch_292.pth", sd, {}, classes)
    info = release_info(vmamba_model._vmamba_cfg("tiny"))
    assert info["sha256"].startswith("dbc0cc4f") and info["file"] == raw.name
    with pytest.raises(ZooError, match="sha256"):  # the published hash: our test file is not the released one
        timm.create_model("vmamba_tiny_v0", pretrained=True)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    monkeypatch.setitem(vmamba_convert.RELEASES["tiny"], "sha256", digest)
    model = timm.create_model("vmamba_tiny_v0", pretrained=True)
    own = model.state_dict()
    assert torch.equal(own["layers.2.blocks.8.mixer.A_logs"], sd["layers.2.blocks.8.self_attention.A_logs"])
    assert torch.equal(own["head.weight"], sd["head.weight"]) and not marker.exists()
    assert (cache / "vmamba_tiny_v0.safetensors").is_file()


def test_pretrained_cfg_names_source_licence_and_metric():
    for name, metric in (("demansia2_tiny", "79.5%"), ("vmamba_tiny_v0", "82.2%"), ("vmamba_small_v0", "83.5%")):
        cfg = timm.models.get_pretrained_cfg(name)
        info = release_info(cfg)
        assert info["url"].startswith("https://") and info["file"] and info["license"], name
        assert metric in info["description"], name
    assert release_info(timm.models.get_pretrained_cfg("vmamba_small_v0"))["sha256"].startswith("8a9b3d39")


def test_release_spec_in_predict_reads_the_cache_or_says_where_to_put_the_file(cache, capsys):
    """`predict.py --ckpt release:palm`: offline and empty, one line naming the Drive URL, the file and the folder
    (exit 2); with the release-format file in the cache, it opens as a palm model."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    import predict

    assert predict.main(["--ckpt", "release:palm", "generate"]) == 2
    err = capsys.readouterr().err
    assert "1AaOvAYpjl3-FsEQ2WD_CtHW74REYTVTZ" in err and "'model-88.pt'" in err and str(cache) in err, err
    assert predict.main(["--ckpt", "release:hand", "identify", "x.jpg"]) == 2
    assert "'best.pth'" in capsys.readouterr().err
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=128, timesteps=10)
    cache.mkdir(parents=True)
    torch.save({"step": 1, "model": diffusion.state_dict(), "opt": {}, "ema": EMA(diffusion).state_dict(),
                "scaler": None, "version": "2.1.1"}, cache / "model-88.pt")
    model = predict.open_model("release:palm")
    assert model.TASK == "palm" and model.cfg.unet_dim == 8


def test_hand_pretrained_true_loads_the_vmamba_release_into_its_encoder(cache):
    """`--set pretrained=true` on hand (backbone vmamba, encoder tiny): the released VMamba-T v0, here from a cache
    already holding the converted safetensors (the second-run path)."""
    from safetensors.torch import save_file

    from model_config import HandConfig
    from models.hand.module import HandBiometrics

    module = HandBiometrics(config=HandConfig.from_presets("micro").replace(encoder="tiny", pretrained=True))
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in module.net.encoder.state_dict().items()}
    cache.mkdir(parents=True)
    save_file(state, str(cache / "vmamba_tiny_v0.safetensors"))
    module.setup("fit")
    for k, v in module.net.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k
