"""Presets are whole: each carries its full network, so `published` alone is the published network and presets compose
predictably (the last one listed decides the network); `--show-config` shows what they resolve to."""
from __future__ import annotations

import json

import pytest

import train
from model_config import REGISTRY, DeMansia2Config, FaceConfig

ARCH = ("d_model", "depth", "attn_layers", "num_heads", "attn_head_dim", "rotary_dim", "d_state", "d_conv", "expand",
        "headdim", "patch_size", "stem_channels", "image_size")


def arch(cfg) -> dict:
    return {k: getattr(cfg, k) for k in ARCH}


def test_published_alone_is_the_published_tiny_network_and_recipe():
    pub, tiny = DeMansia2Config.from_presets("published"), DeMansia2Config.from_presets("tiny")
    assert arch(pub) == arch(tiny) and pub.d_model == 192 and pub.depth == 24
    assert pub.chunk_size == 256 and pub.scan_mode == "legacy" and pub.num_classes == 1000
    assert (pub.optimizer, pub.lr, pub.weight_decay, pub.batch_size, pub.accumulate) == ("lion", 1e-4, 0.5, 256, 4)
    # Fidelity to the published recipe (docs/demansia2.md): constant EMA decay, random bilinear/bicubic crops, LV-ViT token-label smoothing.
    assert pub.ema_decay == 0.9999 and pub.ema_warmup is False
    assert pub.train_interpolation == "random" and pub.token_label_smoothing == "lvvit"
    assert DeMansia2Config.from_presets("tiny,published") == pub  # the old spelling gives the same thing


def test_a_size_preset_after_published_replaces_the_whole_network():
    cfg, small = DeMansia2Config.from_presets("published,small"), DeMansia2Config.from_presets("small")
    assert arch(cfg) == arch(small) and cfg.chunk_size == small.chunk_size and cfg.scan_mode == "bidirectional"
    assert cfg.optimizer == "lion" and cfg.ema_warmup is False  # the recipe stays published
    face = FaceConfig.from_presets("published,tiny")
    assert (face.d_model, face.depth, face.bidirectional, face.pos_embed) == (192, 12, True, True)


@pytest.mark.parametrize("name", ["demansia2", "face"])
def test_every_size_preset_sets_the_same_architecture_fields(name):
    """A field that one size preset sets and another does not would leak between presets that compose."""
    config = REGISTRY[name].config
    sizes = [p for p in config.PRESETS if p in ("micro", "tiny", "small", "base")]
    common = set.intersection(*(set(config.PRESETS[p]) for p in sizes))
    recipe = {"epochs", "batch_size", "lr", "warmup_epochs", "warmup_lr", "weight_decay", "ema_decay", "ema_warmup",
              "randaugment", "random_erasing", "crop_scale_min", "num_workers", "accumulate", "min_lr", "optimizer",
              "betas", "mix_token", "label_smoothing", "drop_path", "augment", "scheduler", "sched_interval"}
    model_fields = {k for p in sizes for k in config.PRESETS[p]} - recipe
    assert model_fields <= common, f"set by some size presets only: {sorted(model_fields - common)}"


def test_show_config_prints_what_a_preset_resolves_to(capsys):
    train.run(["--model", "demansia2", "--preset", "published", "--show-config"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["d_model"] == 192 and shown["chunk_size"] == 256 and shown["scan_mode"] == "legacy"
