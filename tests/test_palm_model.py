"""The palm denoiser and diffusion: the VSS swap, the published network = the library's, our DDIM loop = the
library's, the loss falls, EMA weights are saved and sample after `load_from_checkpoint`, clear checkpoint errors."""
from __future__ import annotations

import pytest
import torch

import train
from model_config import PalmConfig
from models.palm.model import VSSMixer, build_diffusion, build_unet
from models.palm.module import PalmDiffusion
from models.palm.sampling import ddim_sample
from zoo.errors import ZooError

pytestmark = pytest.mark.usefixtures("one_thread")

# 16 px, two stages, 20 timesteps: the smallest network with a VSS level, a down- and an up-sampling.
TINY = dict(image_size=16, unet_dim=8, dim_mults=(1, 2), vss_levels=1, vss_d_state=4, timesteps=20, sampling_steps=4)
TINY_FLAGS = ["--set", "image_size=16", "--set", "unet_dim=8", "--set", "dim_mults=1,2", "--set", "vss_levels=1",
              "--set", "vss_d_state=4", "--set", "timesteps=20", "--set", "sampling_steps=4", "--set", "num_workers=0",
              "--set", "grid_every_n_steps=0", "--batch-size", "8", "--logger", "none", "--progress", "none"]


def tiny_cfg(**kw) -> PalmConfig:
    return PalmConfig.from_presets("micro").replace(**{**TINY, **kw})


def test_vss_blocks_replace_attention_at_the_low_resolutions_only():
    unet = build_unet(tiny_cfg())
    assert isinstance(unet.downs[1][2], VSSMixer) and isinstance(unet.ups[0][2], VSSMixer)
    assert isinstance(unet.mid_attn, VSSMixer)
    assert not isinstance(unet.downs[0][2], VSSMixer) and not isinstance(unet.ups[1][2], VSSMixer)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 19])
    assert unet(x, t).shape == (2, 3, 16, 16)
    plain = build_unet(tiny_cfg(mixer="attention"))
    assert not any(isinstance(m, VSSMixer) for m in plain.modules())


def test_published_preset_is_the_librarys_unet_and_diffusion():
    from denoising_diffusion_pytorch import Unet

    cfg = PalmConfig.from_presets("published")
    with torch.device("meta"):
        ours = build_diffusion(cfg)
        reference = Unet(dim=64, dim_mults=(1, 2, 4, 8), channels=3)
    assert [(n, p.shape) for n, p in ours.model.named_parameters()] == \
           [(n, p.shape) for n, p in reference.named_parameters()]
    assert ours.num_timesteps == 1000 and ours.objective == "pred_noise" and ours.image_size == (128, 128)
    assert cfg.sampling_steps == 1000 and cfg.lr == 2e-5 and cfg.betas == (0.9, 0.99) and cfg.optimizer == "adam"
    assert (cfg.batch_size, cfg.accumulate, cfg.ema_decay, cfg.ema_update_every, cfg.max_steps) == (16, 2, 0.995, 10,
                                                                                                     50_000)


def test_our_ddim_loop_reproduces_the_librarys_ddim_sample():
    torch.manual_seed(0)
    diffusion = build_diffusion(tiny_cfg(objective="pred_noise")).eval()
    diffusion.sampling_timesteps = 4
    shape = (2, 3, 16, 16)
    torch.manual_seed(1)
    want = diffusion.ddim_sample(shape)  # draws its initial noise first, eta 0
    torch.manual_seed(1)
    got = ddim_sample(diffusion, torch.randn(shape), steps=4)
    torch.testing.assert_close(got, want.clamp(0, 1))


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = PalmDiffusion(tiny_cfg())
    images = torch.rand(8, 1, 1, 1).mul(0.6).add(0.2).expand(8, 3, 16, 16).contiguous()  # flat grey levels
    with torch.no_grad():
        before = float(model.fixed_loss(model.net, images, seed=3))
    opt = torch.optim.Adam(model.net.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        model(images).backward()
        opt.step()
    with torch.no_grad():
        after = float(model.fixed_loss(model.net, images, seed=3))
    assert after < 0.8 * before, (before, after)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 6 steps on the demo palms, EMA on from step 2: (model, checkpoint path)."""
    out = train.run(["--model", "palm", "--max-steps", "6", "--limit-val-batches", "1", "--run-name", "ema",
                     "--set", "ema_update_after_step=2", "--set", "ema_update_every=1", "--set", "ema_decay=0.5",
                     "--lr", "3e-3", *TINY_FLAGS, "--set", "grid_every_n_steps=3", "--set", "grid_samples=4"])
    return out["model"], out["run_dir"] / "last.ckpt"


def test_sample_grid_written_every_k_steps_to_the_run_folder(trained):
    _, path = trained
    grids = sorted(p.name for p in (path.parent / "samples").glob("*.png"))
    assert grids == ["step-0000003.png", "step-0000006.png"]
    from PIL import Image

    assert Image.open(path.parent / "samples" / grids[0]).size == (2 * 18 + 2, 2 * 18 + 2)  # 2 x 2 tiles of 16 px


def test_ema_weights_differ_from_raw_and_are_what_sampling_uses_after_loading(trained):
    model, path = trained
    assert model.has_ema and int(model.ema.step) == 6
    loaded = PalmDiffusion.load_from_checkpoint(str(path), map_location="cpu")
    raw = dict(loaded.net.named_parameters())
    ema = dict(loaded.ema_diffusion.named_parameters())
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    # round trip: everything (raw, EMA, EMA counters) comes back
    for k, v in model.cpu().state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # sampling = DDIM with the EMA weights (an independent copy loaded with them), not with the raw ones
    reference = build_diffusion(loaded.cfg).eval()
    reference.load_state_dict(loaded.ema.ema_model.state_dict())
    got = loaded.sample(2, seed=5)
    from models.palm.variations import seeded_noise

    noise = torch.stack([seeded_noise((3, 16, 16), 5, k, "sample") for k in range(2)])
    torch.testing.assert_close(got, ddim_sample(reference, noise, loaded.cfg.sampling_steps))
    assert not torch.allclose(got, loaded.sample(2, seed=5, raw=True))
    assert torch.equal(got, loaded.sample(2, seed=5))  # deterministic per seed


def test_checkpoint_without_ema_or_of_another_task_gives_clear_errors(trained, tmp_path):
    _, path = trained
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    no_ema = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema.")})
    torch.save(no_ema, tmp_path / "no_ema.ckpt")
    model = PalmDiffusion.load_from_checkpoint(str(tmp_path / "no_ema.ckpt"), map_location="cpu")
    assert not model.has_ema
    with pytest.raises(ZooError, match="no EMA weights"):
        model.sample(1)
    assert model.sample(1, raw=True).shape == (1, 3, 16, 16)

    other = dict(ckpt, hyper_parameters={**ckpt["hyper_parameters"], "task": "face"})
    torch.save(other, tmp_path / "face.ckpt")
    with pytest.raises(ZooError, match="'face' model"):
        PalmDiffusion.load_from_checkpoint(str(tmp_path / "face.ckpt"), map_location="cpu")
