"""DeMansia 2 backbone: shapes, parameter counts, key names, MixToken, the attention layer, timm registration."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from model_config import DeMansia2Config, get_entry
from models.blocks.mha import MHA
from models.demansia2 import DeMansia2, DeMansia2Net, mix_box, net_kwargs, swap_box
from zoo.summary import count_parameters

SMALL = dict(d_model=32, depth=3, attn_layers=(1,), num_heads=2, attn_head_dim=16, rotary_dim=8, d_state=8,
             headdim=16, chunk_size=16, image_size=32, patch_size=4, stem_channels=8, num_classes=5)


def small_net(**changes) -> DeMansia2Net:
    torch.manual_seed(0)
    return DeMansia2Net(**net_kwargs(DeMansia2Config.from_presets("micro").replace(**{**SMALL, **changes})))


@pytest.mark.parametrize("scan_mode", ["bidirectional", "legacy"])
def test_shapes_at_two_resolutions(scan_mode):
    net = small_net(scan_mode=scan_mode).eval()
    for size, grid in ((32, 4), (64, 8)):  # 64 px: position embedding resampled from 4x4 to 8x8
        x = torch.randn(2, 3, size, size)
        feats = net.forward_features(x)
        assert feats.shape == (2, grid * grid + 1, 32)
        assert net(x).shape == (2, 5)
        cls, aux = net.forward_train(x)
        assert cls.shape == (2, 5) and aux.shape == (2, grid * grid, 5)
        assert torch.isfinite(net(x)).all()


def test_eval_logits_are_head_plus_half_max_aux():
    net = small_net().eval()
    x = torch.randn(3, 3, 32, 32)
    cls, aux = net.forward_train(x)
    torch.testing.assert_close(net(x), cls + 0.5 * aux.amax(1))


def test_class_token_sits_in_the_middle():
    net = small_net().eval()
    tokens = net.embed(torch.randn(1, 3, 32, 32))  # 16 patches -> class token at index 8
    expected = net.cls_token[0, 0] + net.pos_embed[0, 8]
    torch.testing.assert_close(tokens[0, 8], expected)


def test_tiny_and_small_parameter_counts_match_published():
    # Published code counts Tiny 9,514,032 and Small 32,746,032 (tied dt_bias/A_log counted twice).
    entry = get_entry("demansia2")
    for preset, published in (("tiny", 9_514_032), ("small", 32_746_032), ("tiny,published", 9_514_032)):
        n = count_parameters(entry, preset)
        assert abs(n - published) / published < 0.01, (preset, n)
    assert count_parameters(entry, "tiny") == 9_514_032


def test_tiny_state_dict_keys_mirror_the_release():
    with torch.device("meta"):
        net = DeMansia2Net(**net_kwargs(DeMansia2Config.from_presets("tiny,published")))
    sd = net.state_dict()
    assert len(sd) == 393
    assert sd["layers.0.mixer.in_proj.weight"].shape == (1032, 192)
    assert sd["layers.0.mixer.conv1d_b.weight"].shape == (640, 1, 4)
    assert sd["layers.0.mixer.out_proj_b.weight"].shape == (192, 384)
    assert sd["layers.10.mixer.in_proj.weight"].shape == (864, 192)
    assert sd["layers.10.mixer.in_proj.bias"].shape == (864,)
    assert sd["layers.20.mixer.conv1d.weight"].shape == (864, 1, 4)
    assert sd["layers.20.mixer.out_proj.weight"].shape == (192, 288)
    assert sd["pos_embed"].shape == (1, 197, 192)
    assert sd["patch_embed.proj.weight"].shape == (192, 64, 8, 8)
    for k in ("cls_token", "norm_f.weight", "head.weight", "aux_head.bias", "patch_embed.bn3.running_var"):
        assert k in sd


def test_lightning_module_is_meta_device_safe_and_prefixes_model():
    with torch.device("meta"):
        module = DeMansia2(config=DeMansia2Config.from_presets("tiny"))
    assert all(k.startswith("net.") for k in module.state_dict())


def test_mix_box_and_swap_back():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        (top, left, bottom, right), lam = mix_box((4, 6), gen)
        assert 0 <= top <= bottom <= 4 and 0 <= left <= right <= 6
        assert math.isclose(lam, 1 - (bottom - top) * (right - left) / 24)
    x = torch.arange(4 * 2 * 3 * 3, dtype=torch.float32).reshape(4, 2, 3, 3)
    box = (0, 1, 2, 3)
    mixed = swap_box(x, box)
    torch.testing.assert_close(mixed[0, :, 0:2, 1:3], x[3, :, 0:2, 1:3])  # inside: the reversed batch's patch
    torch.testing.assert_close(mixed[0, :, 2], x[0, :, 2])  # outside: unchanged
    torch.testing.assert_close(swap_box(mixed, box), x)  # swapping twice restores


def test_mixtoken_aux_outputs_are_swapped_back():
    # With a box the token logits must belong to the image whose patch they were computed on: image i's tokens
    # inside the box were computed in the partner's (reversed batch's) sequence at image i's patches.
    net = small_net().eval()
    x = torch.randn(4, 3, 32, 32)
    box = (1, 1, 3, 4)
    _, aux = net.forward_train(x, box)
    # By hand: token logits of the mixed batch, then the box's tokens moved back to the image they came from.
    feats = net.forward_features(x, box)
    _, patch_tokens = net.split_tokens(feats)
    raw_aux = net.aux_head(patch_tokens).reshape(4, 4, 4, 5)
    expected = raw_aux.clone()
    expected[:, 1:3, 1:4] = raw_aux.flip(0)[:, 1:3, 1:4]
    torch.testing.assert_close(aux, expected.reshape(4, 16, 5))
    assert not torch.allclose(aux, raw_aux.reshape(4, 16, 5))


def test_mha_matches_mamba_ssm_without_rotary(mamba_ref, monkeypatch):
    import mamba_ssm.modules.mha as ref_mha

    monkeypatch.setattr(ref_mha, "causal_conv1d_fn", None)  # its pure-PyTorch conv path (no CUDA extension here)
    RefMHA = ref_mha.MHA
    torch.manual_seed(0)
    ref = RefMHA(48, num_heads=3, head_dim=24, d_conv=4, causal=False, qkv_proj_bias=True, out_proj_bias=True)
    ours = MHA(48, num_heads=3, head_dim=24, d_conv=4)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 11, 48)
    torch.testing.assert_close(ours(x), ref(x))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_rotary_matches_complex_rotation():
    # Non-interleaved rotary on the first 8 of 16 channels: pair (i, i + 4) rotates by pos * base^(-2i/8).
    from models.blocks.mha import apply_rotary, rotary_tables

    x = torch.randn(1, 5, 2, 16)
    cos, sin = rotary_tables(5, 8, 10000.0, x.device, x.dtype)
    out = apply_rotary(x, cos, sin)
    theta = torch.arange(5)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2) / 8)  # (L, 4)
    z = torch.complex(x[..., :4], x[..., 4:8]) * torch.polar(torch.ones_like(theta), theta)[None, :, None]
    torch.testing.assert_close(out[..., :4], z.real)
    torch.testing.assert_close(out[..., 4:8], z.imag)
    torch.testing.assert_close(out[..., 8:], x[..., 8:])


@pytest.mark.parametrize("name", ["demansia2_micro", "demansia2_tiny", "demansia2_small"])
def test_timm_create_model(name):
    assert name in timm.list_models("demansia2_*")
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg["input_size"][0] == 3 and cfg["mean"] and cfg["std"] and 0 < cfg["crop_pct"] <= 1
    assert model.num_classes in (10, 1000)


def test_timm_micro_features_and_heads():
    model = timm.create_model("demansia2_micro", num_classes=0, depth=2, attn_layers=(1,)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, model.num_features)
    model = timm.create_model("demansia2_micro", num_classes=7, depth=2, attn_layers=(1,)).eval()
    feats = model.forward_features(x)
    assert model.forward_head(feats).shape == (2, 7)
    d = model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (2, d)
    fx = timm.create_model("demansia2_micro", features_only=True, depth=3, attn_layers=(1,), out_indices=(1, 2))
    maps = fx(x)
    assert [tuple(m.shape) for m in maps] == [(2, d, 4, 4)] * 2  # micro: 64 px / stride 16 = 4x4 tokens
    assert fx.feature_info.channels() == [d, d] and fx.feature_info.reduction() == [16, 16]
