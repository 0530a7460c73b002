"""The hand network and its VMamba v0 encoder (`models.vmamba`): VMamba v0 checkpoints (names and shapes synthesised
from VMamba's v0 layout, tiny and small) load through the key map with nothing left over; timm names and
features_only; forward shapes at 224 for micro, tiny and the published network."""
from __future__ import annotations

import math

import pytest
import timm
import torch

import models  # noqa: F401 - registers the timm names
from model_config import HandConfig
from models.hand.model import HandNet
from models.hand.module import HandBiometrics
from models.vmamba import VMambaV0, load_vmamba_v0


def v0_state_dict(depths: tuple[int, ...], num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """A state_dict with VMamba v0's key names and shapes, random values."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"patch_embed.proj.weight": r(96, 3, 4, 4), "patch_embed.proj.bias": r(96),
          "patch_embed.norm.weight": r(96), "patch_embed.norm.bias": r(96)}
    for i, depth in enumerate(depths):
        c = 96 * 2**i
        d, rank = 2 * c, math.ceil(c / 16)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            sd.update({p + "ln_1.weight": r(c), p + "ln_1.bias": r(c)})
            a = p + "self_attention."
            sd.update({a + "in_proj.weight": r(2 * d, c), a + "conv2d.weight": r(d, 1, 3, 3), a + "conv2d.bias": r(d),
                       a + "x_proj_weight": r(4, rank + 32, d), a + "dt_projs_weight": r(4, d, rank),
                       a + "dt_projs_bias": r(4, d), a + "A_logs": r(4 * d, 16), a + "Ds": r(4 * d),
                       a + "out_norm.weight": r(d), a + "out_norm.bias": r(d), a + "out_proj.weight": r(c, d)})
        if i < len(depths) - 1:
            sd.update({f"layers.{i}.downsample.norm.weight": r(4 * c), f"layers.{i}.downsample.norm.bias": r(4 * c),
                       f"layers.{i}.downsample.reduction.weight": r(2 * c, 4 * c)})
    sd.update({"norm.weight": r(768), "norm.bias": r(768), "head.weight": r(num_classes, 768),
               "head.bias": r(num_classes)})
    return sd


@pytest.mark.parametrize("name, depths", [("vmamba_tiny_v0", (2, 2, 9, 2)), ("vmamba_small_v0", (2, 2, 27, 2))])
def test_v0_checkpoint_loads_with_nothing_left_over(name, depths, tmp_path):
    sd = v0_state_dict(depths)
    with torch.device("meta"):
        model = timm.create_model(name)  # structure only; to_empty below gives it storage
    model = model.to_empty(device="cpu")
    path = tmp_path / "v0.pth"
    torch.save({"model": sd, "epoch": 1, "config": "yaml text"}, path)
    report = load_vmamba_v0(model, path)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    own = model.state_dict()
    last = len(depths) - 1
    torch.testing.assert_close(own[f"layers.2.blocks.{depths[2] - 1}.mixer.A_logs"],
                               sd[f"layers.2.blocks.{depths[2] - 1}.self_attention.A_logs"])
    torch.testing.assert_close(own[f"layers.{last}.blocks.0.norm.weight"], sd[f"layers.{last}.blocks.0.ln_1.weight"])
    torch.testing.assert_close(own["layers.0.downsample.reduction.weight"], sd["layers.0.downsample.reduction.weight"])


def test_load_reports_what_did_not_load():
    model = VMambaV0(24, (1, 1, 1, 1), 8)
    sd = {k.replace(".norm.", ".ln_1.") if ".blocks." in k else k: v for k, v in model.state_dict().items()}
    sd.pop("norm.weight")
    sd["head.weight"] = torch.zeros(10, 192)
    sd["patch_embed.proj.weight"] = torch.zeros(24, 3, 2, 2)
    report = load_vmamba_v0(model, sd)
    assert report["missing"] == ["norm.weight", "patch_embed.proj.weight"]
    assert report["unexpected"] == ["head.weight"] and report["mismatched"] == ["patch_embed.proj.weight"]


def test_timm_features_only_micro():
    net = timm.create_model("vmamba_micro_v0", features_only=True)
    feats = net(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    assert net.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("preset", ["micro", "tiny", "published"])
def test_forward_shapes_at_224(preset, monkeypatch):
    cfg = HandConfig.from_presets(preset).replace(image_size=224, num_identities=7)
    torch.manual_seed(0)
    device = "cpu"
    if preset != "micro":
        # Shapes only, on the meta device (no memory, no compute); the scan itself is tested in test_blocks_ss2d.
        from models.blocks import SS2D

        monkeypatch.setattr(SS2D, "scan", lambda self, xs: xs)
        device = "meta"
    with torch.device(device):
        module = HandBiometrics(cfg).eval()
        net = module.net
        with torch.no_grad():
            out = net(torch.randn(1, 3, 224, 224))
    assert out["identity"].shape == (1, 7) and out["gender"].shape == (1, 2) and out["age"].shape == (1, 6)
    if preset == "published":
        assert out["embedding"].shape == (1, 7 * 7 * 768) and "silhouette" not in out  # 37,632 features
        assert net.identity_head.net[0].in_features == 37632 and net.encoder.dims[-1] == 768
        assert sum(len(s.blocks) for s in net.encoder.layers) == 2 + 2 + 27 + 2
        assert not any(p.requires_grad for p in net.encoder.parameters())  # frozen encoder
        assert module.criterion is None and net.decoder is None
    else:
        assert out["silhouette"].shape == (1, 1, 224, 224) and out["embedding"].shape == (1, cfg.embedding_dim)
    if device == "cpu":
        torch.testing.assert_close(out["embedding"].norm(dim=-1), torch.ones(1))


def test_decoder_uses_additive_skips_and_patch_expand():
    cfg = HandConfig.from_presets("micro").replace(num_identities=3)
    net = HandNet(cfg)
    up = net.decoder.layers_up
    assert up[0].upsample is None and up[1].upsample.expand.weight.shape == (256, 128)  # 128 -> 2 x 128, then 2x2
    assert up[3].upsample.norm.normalized_shape == (16,) and net.decoder.final_conv.in_channels == 16 // 4
