"""Face model: the published architecture, our variants, the losses, and the retrieval metrics on a hand example."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from losses.metric import MetricLoss
from model_config import FaceConfig
from models.blocks.bidirectional import BidirectionalMamba2
from models.blocks.mamba2 import Mamba2
from models.face import FaceEmbedder, upstream_state_dict_to_zoo
from models.face.metrics import retrieval_metrics
from zoo.verification import calibrate_threshold


def test_published_preset_is_upstream_recssm():
    model = FaceEmbedder(FaceConfig.from_presets("published"))
    enc = model.net.encoder
    assert len(enc.blocks) == 6 and enc.pos_embed is None
    assert all(type(b.mixer) is Mamba2 and isinstance(b.norm, nn.LayerNorm) for b in enc.blocks)
    m = enc.blocks[0].mixer
    assert (m.d_model, m.d_state, m.d_conv, m.expand, m.headdim) == (128, 64, 4, 2, 32)
    assert enc.patch_embed.proj.kernel_size == enc.patch_embed.proj.stride == (8, 8)
    assert enc.patch_embed(torch.zeros(1, 3, 128, 128)).shape == (1, 256, 128)  # 16 x 16 tokens
    assert model.net.head.out_features == 128
    out = model.embed(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, 128) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    names = set(model.state_dict())
    for key in ("net.encoder.patch_embed.proj.weight", "net.encoder.patch_embed.norm.weight",
                "net.encoder.blocks.5.norm.weight", "net.encoder.blocks.5.mixer.in_proj.weight",
                "net.encoder.blocks.0.mixer.A_log", "net.encoder.final_norm.bias", "net.head.weight", "threshold"):
        assert key in names
    cfg = model.cfg
    assert (cfg.metric_loss, cfg.miner, cfg.margin, cfg.stage2_miner, cfg.m_per_class, cfg.lr, cfg.warmup_epochs) == \
        ("triplet", "all", 0.2, "hard", 2, 3e-3, 10.0)


def test_upstream_keys_map_onto_ours():
    ours = FaceEmbedder(FaceConfig.from_presets("published")).state_dict()
    upstream = {"patch_embed.proj.weight": None, "patch_embed.norm.bias": None, "ssm_blocks.3.in_proj.weight": None,
                "ssm_blocks.3.dt_bias": None, "norms.3.weight": None, "final_norm.weight": None, "head.bias": None}
    mapped = upstream_state_dict_to_zoo(upstream)
    assert set(mapped) <= set(ours), set(mapped) - set(ours)


def test_default_micro_model_and_timm_backbone():
    model = FaceEmbedder(FaceConfig.from_presets("micro"))
    assert all(isinstance(b.mixer, BidirectionalMamba2) for b in model.net.encoder.blocks)
    assert model.net.encoder.pos_embed.shape == (1, 64, 64)  # conv stem of stride 8: 8x8 tokens at 64 px
    assert model.cfg.stem == "conv"
    import timm

    backbone = timm.create_model("face_mamba_micro")
    assert isinstance(backbone.get_submodule(backbone.pretrained_cfg["first_conv"]), nn.Conv2d)
    assert model.embed(torch.randn(3, 3, 64, 64)).shape == (3, 64)
    timm_model = FaceEmbedder(FaceConfig.from_presets("micro").replace(backbone="resnet10t", embedding_dim=32))
    out = timm_model.embed(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 32) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("size", [64, 60, 37])
def test_conv_stem_gives_the_tokens_it_announces(size):
    """stem="conv": ConvStem (stride 2p) + LayerNorm; the position embedding is sized for exactly the tokens it gives,
    at sizes that do not divide evenly too."""
    cfg = FaceConfig.from_presets("micro").replace(stem="conv", patch_size=4, stem_channels=8, image_size=size)
    enc = FaceEmbedder(cfg).net.encoder
    side = math.ceil(size / 2) // 4
    tokens = enc.patch_embed(torch.randn(2, 3, size, size))
    assert tokens.shape == (2, side * side, 64) and enc.pos_embed.shape == (1, side * side, 64)
    assert enc(torch.randn(2, 3, size, size)).shape == (2, 64)
    names = set(enc.state_dict())
    assert {"patch_embed.stem.conv1.weight", "patch_embed.stem.bn3.running_mean", "patch_embed.stem.proj.weight",
            "patch_embed.norm.weight"} <= names
    assert enc.patch_embed.stem.conv1.out_channels == 8


def test_conv_stem_needs_an_image_of_its_stride():
    from zoo.errors import ZooError

    with pytest.raises(ZooError, match=r"image_size.*at least 2 \* patch_size = 8 \(the conv stem's stride\)"):
        FaceConfig.from_presets("micro").replace(stem="conv", patch_size=4, image_size=6).check()
    FaceConfig.from_presets("micro").replace(stem="patch", patch_size=4, image_size=6).check()  # stride 4 fits


@pytest.mark.parametrize("kind", ["triplet", "arcface", "cosface"])
def test_losses_are_submodules_with_their_weights_optimised(kind):
    cfg = FaceConfig.from_presets("micro").replace(metric_loss=kind, num_identities=5, embedding_dim=8, d_model=16, depth=1,
                                                   headdim=8, image_size=16)
    model = FaceEmbedder(cfg)
    emb = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    labels = torch.arange(5).repeat(2)
    assert torch.isfinite(model.criterion(emb, labels))
    if kind != "triplet":
        assert model.criterion.loss.W.shape == (8, 5)
        assert any(n.startswith("criterion.loss.W") for n, _ in model.named_parameters())


def test_miner_switch():
    loss = MetricLoss("triplet", 8, miner="all", margin=0.2)
    assert loss.miner.type_of_triplets == "all"
    loss.set_miner("hard")
    assert loss.miner.type_of_triplets == "hard"
    assert MetricLoss("arcface", 8, num_classes=3).margin == 28.6


def test_retrieval_metrics_hand_example():
    # Unit vectors at these angles (degrees); classes A = {0, 20, 50}, B = {45, 90, 100}. For each query the R = 2
    # nearest others (R = class size - 1), by angle:
    #   0: 20(A) 45(B) -> P@1 1, R-prec 1/2, AP@R 1/2      20: 0(A) 45(B)  -> 1, 1/2, 1/2
    #  50: 45(B) 20(A) -> 0, 1/2, (0 + 1/2)/2 = 1/4        45: 50(A) 20(A) -> 0, 0, 0
    #  90: 100(B) 50(A) -> 1, 1/2, 1/2                    100: 90(B) 50(A) -> 1, 1/2, 1/2
    angles = torch.tensor([0.0, 20.0, 50.0, 45.0, 90.0, 100.0]) * math.pi / 180
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    m = retrieval_metrics(emb, labels)
    assert m["rank1"] == pytest.approx(4 / 6)
    assert m["r_precision"] == pytest.approx(2.5 / 6)
    assert m["mean_average_precision_at_r"] == pytest.approx(2.25 / 6)


def test_threshold_calibration_hand_example():
    # Two tight clusters far apart: every same pair has cosine ~1, every different pair ~0.
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.14, 0.99]])
    thr, acc = calibrate_threshold(emb, torch.tensor([0, 0, 1, 1]))
    assert acc == 1.0 and 0.28 < thr < 0.99
