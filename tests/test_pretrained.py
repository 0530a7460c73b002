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


HAND_PUBLISHED = ["--model", "hand", "--preset", "published", "--logger", "none", "--progress", "none",
                  "--max-steps", "1", "--limit-val-batches", "0", "--batch-size", "4", "--set", "num_workers=0",
                  "--set", "image_size=32", "--set", "aspects=dorsal right", "--set", "early_stopping_patience=0"]


@pytest.fixture
def micro_sized_small(monkeypatch):
    """`encoder=small` builds VMamba v0 at micro's sizes, so the published preset's whole chain (the Small release's
    file name, URL and cache entry, its format, the frozen encoder) runs in a second; the Small layout itself is
    checked against VMamba's key names in test_hand_model."""
    from models.hand import model as hand_model

    monkeypatch.setitem(hand_model.ENCODERS, "small", hand_model.ENCODERS["micro"])


@pytest.mark.usefixtures("one_thread")
def test_hand_published_starts_from_the_vmamba_small_release_without_a_flag(cache, micro_sized_small, monkeypatch,
                                                                            tmp_path, capsys):
    """`--preset published` alone (no pretrained flag): the frozen encoder holds VMamba v0 Small's released weights,
    from a cache holding a file in the release's format (its `model` entry, not `model_ema`); a second run reads the
    converted safetensors only."""
    from foreign_release import foreign_modules, vmamba_v0_release
    from test_release_formats import _v0_names

    from model_config import HandConfig
    from models.hand.module import HandBiometrics
    from models.vmamba import convert as vmamba_convert

    torch.manual_seed(0)
    own = HandBiometrics(config=HandConfig.from_presets("published").replace(image_size=32)).net.encoder
    model = {**_v0_names({k: torch.randn_like(v) for k, v in own.state_dict().items()}),
             "head.weight": torch.randn(1000, 128), "head.bias": torch.randn(1000)}
    cache.mkdir(parents=True)
    marker = tmp_path / "RAN"
    with foreign_modules(tmp_path, marker) as classes:
        raw = vmamba_v0_release(cache / "vssmsmall_dp03_ckpt_epoch_238.pth", model,
                                {k: v + 1 for k, v in model.items()}, classes)
    monkeypatch.setitem(vmamba_convert.RELEASES["small"], "sha256", hashlib.sha256(raw.read_bytes()).hexdigest())
    encoder = train.run(HAND_PUBLISHED)["model"].net.encoder
    assert "loaded the released vmamba_small_v0 weights" in capsys.readouterr().out
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen: one step leaves it as loaded
    assert not marker.exists() and (cache / "vmamba_small_v0.safetensors").is_file()
    raw.unlink()  # a second run reads the converted cache only
    again = HandBiometrics(config=HandConfig.from_presets("published").replace(image_size=32))
    again.setup("fit")
    for run, enc in (("first", encoder), ("second", again.net.encoder)):
        got = _v0_names(enc.state_dict())
        assert got.keys() == model.keys() - {"head.weight", "head.bias"}, run
        for k, v in got.items():
            assert torch.equal(v, model[k]), (run, k)


@pytest.mark.usefixtures("one_thread")
def test_the_release_is_fetched_in_prepare_data_and_never_for_a_resume(cache, micro_sized_small):
    """Lightning's `prepare_data` (once per node, before every rank's `setup`) is where a new run fetches the release:
    offline with an empty cache it is the one that stops; a resume (the trainer's ckpt_path set) fetches nothing."""
    from types import SimpleNamespace

    from model_config import HandConfig, PalmConfig
    from models.hand.module import HandBiometrics
    from models.palm.module import PalmDiffusion

    hand = HandBiometrics(config=HandConfig.from_presets("published").replace(image_size=32))
    palm = PalmDiffusion(config=PalmConfig.from_presets("published").replace(pretrained=True))
    for module, file in ((hand, "vssmsmall_dp03_ckpt_epoch_238.pth"), (palm, "model-88.pt")):
        module._trainer = SimpleNamespace(ckpt_path="last.ckpt")
        module.prepare_data()
        assert not cache.exists()
        module._trainer = None
        with pytest.raises(ZooError, match=file):
            module.prepare_data()


@pytest.mark.usefixtures("one_thread")
def test_hand_published_offline_without_the_release_is_one_line(cache, micro_sized_small, tmp_path, capsys):
    """Offline, empty cache: `--preset published` stops before training with one line naming the release URL, the file
    and the folder (exit 2). A file named by pretrained_ckpt takes precedence: nothing is fetched then; `micro` after
    `published` (the tests' and demos' combination) turns the release off."""
    from model_config import HandConfig

    assert HandConfig.from_presets("published").pretrained is True
    assert HandConfig.from_presets("published,micro").pretrained is False
    assert train.main(HAND_PUBLISHED) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "vssmsmall_dp03_ckpt_epoch_238.pth" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "https://github.com/MzeroMiko/VMamba/releases/download/" in lines[0] and str(cache) in lines[0]
    v0 = tmp_path / "v0.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.ones(16, 3, 4, 4)}}, v0)
    out = train.run([*HAND_PUBLISHED, "--set", f"pretrained_ckpt={v0}"])
    assert torch.equal(out["model"].net.encoder.state_dict()["patch_embed.proj.weight"], torch.ones(16, 3, 4, 4))
    assert not cache.exists()


def _trainer_checkpoint(path, seed: int = 0):
    """denoising-diffusion-pytorch's `Trainer.save` format; the EMA weights differ from the raw ones (+0.01)."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(seed)
    diffusion = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=128, timesteps=10, objective="pred_noise",
                                  beta_schedule="sigmoid")
    ema = EMA(diffusion, beta=0.995, update_every=10)
    with torch.no_grad():
        for p in ema.ema_model.parameters():
            p.add_(0.01)
    ema.initted.fill_(True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 88_000, "model": diffusion.state_dict(), "opt": {}, "ema": ema.state_dict(), "scaler": None,
                "version": "2.1.1"}, path)
    return ema.ema_model.state_dict()


PALM_PUBLISHED = ["--model", "palm", "--preset", "published", "--logger", "none", "--progress", "none",
                  "--max-steps", "1", "--limit-val-batches", "0", "--batch-size", "2", "--set", "accumulate=1",
                  "--set", "num_workers=0", "--set", "image_size=16", "--set", "unet_dim=8", "--set", "dim_mults=1,2",
                  "--set", "timesteps=10", "--set", "sampling_steps=10", "--set", "grid_every_n_steps=0"]


@pytest.mark.usefixtures("one_thread")
def test_palm_pretrained_true_starts_from_the_released_ema_weights(cache, capsys):
    """`train.py --model palm --preset published --set pretrained=true` fine-tunes from the released Trainer
    checkpoint's EMA weights (not its raw `model`, 0.01 away): after one Adam step at lr 2e-5 the network is within
    1e-4 of them (its EMA copy starts as a copy of it, as ema-pytorch's first update does). Another size is refused
    by name."""
    from model_config import PalmConfig
    from models.palm.module import PalmDiffusion
    from zoo.errors import ZooError

    assert PalmConfig.from_presets("published").pretrained is False  # the published recipe trains from scratch
    ema = _trainer_checkpoint(cache / "model-88.pt")
    out = train.run([*PALM_PUBLISHED, "--set", "pretrained=true"])
    assert "loaded the EMA weights of the released model-88.pt" in capsys.readouterr().out
    model = out["model"]
    assert out["trainer"].global_step == 1 and (cache / "palm_published.safetensors").is_file()
    net, copy = model.net.state_dict(), model.ema.ema_model.state_dict()
    assert net.keys() == copy.keys() == ema.keys()
    for k, v in ema.items():
        assert torch.equal(copy[k], net[k]), k
        assert (net[k].float() - v.float()).abs().max() <= 1e-4, k
    cfg = model.cfg.replace(unet_dim=16)
    with pytest.raises(ZooError, match=r"unet_dim=8.*unet_dim=16"):
        PalmDiffusion(config=cfg).setup("fit")
    with pytest.raises(ZooError, match="mixer=attention"):
        cfg.replace(mixer="vss")


@pytest.mark.usefixtures("one_thread")
def test_palm_pretrained_offline_without_the_release_is_one_line(cache, capsys):
    assert train.main([*PALM_PUBLISHED, "--set", "pretrained=true"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "'model-88.pt'" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "1AaOvAYpjl3-FsEQ2WD_CtHW74REYTVTZ" in lines[0] and str(cache) in lines[0]


def test_download_writes_through_a_temporary_name_of_its_own(tmp_path):
    """The file appears whole under its name and no temporary file is left (each process writes its own)."""
    from zoo.pretrained import download

    src = tmp_path / "released.bin"
    src.write_bytes(b"x" * 3_000_000)
    dst = tmp_path / "cache" / "released.bin"
    download(src.as_uri(), dst)
    assert dst.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["released.bin"]
