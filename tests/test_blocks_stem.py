"""Convolutional stems (models/blocks/stem.py): the token grid they give, their layers, and their use by DeMansia 2
(`stem=lvvit|early_conv`) and the face encoder (`stem=conv`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model_config import DeMansia2Config
from models.blocks.stem import ConvStem, EarlyConvStem


def test_lvvit_stem_grid_and_keys():
    stem = ConvStem(3, 48, patch_size=4, channels=8)
    assert stem(torch.randn(2, 3, 64, 48)).shape == (2, 48, 8, 6) and stem.stride == 8
    assert {"conv1.weight", "bn1.running_var", "conv3.weight", "proj.weight", "proj.bias"} <= set(stem.state_dict())
    assert stem.conv1.kernel_size == (7, 7) and stem.proj.kernel_size == stem.proj.stride == (4, 4)


@pytest.mark.parametrize("stride", [2, 8, 16])
def test_early_conv_stem_halves_the_resolution_per_stage(stride):
    stem = EarlyConvStem(3, 40, stride=stride, channels=8)
    x = torch.randn(2, 3, 64, 64)
    assert stem(x).shape == (2, 40, 64 // stride, 64 // stride) and stem.stride == stride
    convs = [m for m in stem.stages.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == stride.bit_length() - 1
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs)
    assert [c.out_channels for c in convs] == [8 * 2**i for i in range(len(convs))]
    assert stem.proj.kernel_size == (1, 1) and stem.proj.in_channels == convs[-1].out_channels


@pytest.mark.parametrize("stride", [1, 6, 12])
def test_early_conv_stem_refuses_a_stride_that_is_not_a_power_of_two(stride):
    with pytest.raises(ValueError, match=f"power-of-two stride >= 2, got {stride}"):
        EarlyConvStem(3, 8, stride=stride)


def test_demansia2_takes_either_stem():
    import timm

    from models.demansia2.model import DeMansia2Net, net_kwargs

    base = DeMansia2Config.from_presets("micro").replace(stem="lvvit", stem_channels=8)
    lv = DeMansia2Net(**net_kwargs(base))
    early = DeMansia2Net(**net_kwargs(base.replace(stem="early_conv")))
    assert isinstance(lv.patch_embed, ConvStem) and isinstance(early.patch_embed, EarlyConvStem)
    assert early.grid == lv.grid == (4, 4) and early.patch_embed.stride == 16
    x = torch.randn(2, 3, 64, 64)
    assert early(x).shape == lv(x).shape == (2, 10)
    with pytest.raises(ValueError, match="stem must be 'lvvit' or 'early_conv'"):
        DeMansia2Net(**{**net_kwargs(base), "stem": "patch"})
    model = timm.create_model("demansia2_micro")
    assert isinstance(model.get_submodule(model.pretrained_cfg["first_conv"]), nn.Conv2d)


def test_configs_saved_before_the_stem_field_keep_their_stem():
    """Checkpoints written before `stem` existed carry no such field: they must rebuild the stem they were trained
    with (LV-ViT's / the patch conv), not the new micro default, or their weights would not load."""
    from model_config import FaceConfig
    from models.demansia2 import DeMansia2
    from models.face import FaceEmbedder

    for module_cls, cfg_cls, key in ((DeMansia2, DeMansia2Config, "net.patch_embed.conv1.weight"),
                                     (FaceEmbedder, FaceConfig, "net.encoder.patch_embed.proj.weight")):
        saved = cfg_cls.from_presets("micro").to_dict()
        assert saved.pop("stem") != cfg_cls().stem  # micro's stem is the new one
        assert key in module_cls(config=saved).state_dict()
