"""Hand on any timm backbone (`--set backbone=NAME`): its levels at reductions 4-32 projected to the VMamba dims, the
same outputs, training, checkpoints and pretrained weights from the cache; a backbone without those levels is refused.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import timm
import torch

import train
from model_config import HandConfig
from models.hand.model import HandNet
from models.hand.module import HandBiometrics
from zoo.errors import ZooError

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--model", "hand", "--logger", "none", "--progress", "none", "--set", "num_workers=0", "--set",
        "image_size=32", "--set", "aspects=dorsal right", "--batch-size", "16", "--set", "warmup_epochs=0"]


@pytest.mark.parametrize("preset", ["micro", "published"])
def test_timm_backbone_gives_the_vmamba_outputs(preset):
    cfg = HandConfig.from_presets(preset).replace(encoder="micro", pretrained=False, image_size=64, num_identities=5)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    ours, cnn = HandNet(cfg).eval(), HandNet(cfg.replace(backbone="test_resnet")).eval()
    with torch.no_grad():
        a, b = ours(x), cnn(x)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert cnn.encoder.feature_info.reduction() == [4, 8, 16, 32]
    dims = [p.out_features for p in cnn.adapter.proj]
    assert dims == ours.encoder.dims and [p.in_features for p in cnn.adapter.proj] == [32, 48, 192, 96]
    # The VMamba path is unchanged: no adapter, the v0 key layout.
    assert ours.adapter is None and not any(k.startswith("adapter.") for k in ours.state_dict())
    assert "encoder.layers.0.blocks.0.norm.weight" in ours.state_dict()
    if preset == "micro":
        assert b["silhouette"].shape == (2, 1, 64, 64)
        torch.testing.assert_close(b["embedding"].norm(dim=-1), torch.ones(2))


def test_adapter_reads_channels_first_and_channels_last_maps():
    """timm gives NCHW maps, or NHWC ones for models such as Swin (`output_fmt`): both project to the same output."""
    from models.hand.model import FeatureAdapter

    torch.manual_seed(0)
    first = FeatureAdapter([8, 12], [16, 32])
    last = FeatureAdapter([8, 12], [16, 32], channels_last=True)
    last.load_state_dict(first.state_dict())
    feats = [torch.randn(2, 8, 4, 4), torch.randn(2, 12, 2, 2)]
    a, b = first(feats), last([f.permute(0, 2, 3, 1) for f in feats])
    assert [tuple(x.shape) for x in a] == [(2, 4, 4, 16), (2, 2, 2, 32)]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_micro_sizes_of_the_benchmark_pair():
    """The benchmark's CNN row is size-matched: test_convnext within 10% of the VMamba micro network."""
    cfg = HandConfig.from_presets("micro").replace(num_identities=40)
    vmamba = HandBiometrics(cfg).parameter_count()
    convnext = HandBiometrics(cfg.replace(backbone="test_convnext")).parameter_count()
    assert abs(convnext - vmamba) < 0.1 * vmamba, (vmamba, convnext)


class _Weights(L.Callback):
    def on_train_start(self, trainer, module):
        self.before = {k: v.clone() for k, v in module.net.encoder.state_dict().items()}


def test_trains_and_round_trips_a_checkpoint():
    weights = _Weights()
    out = train.run([*ARGS, "--set", "backbone=test_resnet", "--epochs", "1", "--limit-train-batches", "2",
                     "--run-name", "timm-backbone"], extra_callbacks=[weights])
    model = out["model"].cpu().eval()
    after = model.net.encoder.state_dict()
    assert not torch.equal(after["conv1.0.weight"], weights.before["conv1.0.weight"])  # the encoder trained
    assert np.isfinite(float(out["trainer"].callback_metrics["val/loss"]))
    loaded = HandBiometrics.load_from_checkpoint(str(out["run_dir"] / "last.ckpt"), map_location="cpu").eval()
    assert loaded.cfg.backbone == "test_resnet" and loaded.cfg == model.cfg
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = loaded(x), model(x)
    for k in ("identity", "gender", "age", "embedding", "silhouette"):
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("sets, words", [
    (["backbone=resnet10tt"], ["Unknown backbone 'resnet10tt'", "resnet10t"]),
    (["pretrained=true"], ["pretrained=True", "timm backbone", "pretrained_ckpt"]),
    (["backbone=test_resnet", "pretrained_ckpt=v0.pth"], ["pretrained_ckpt=v0.pth", "backbone=own"]),
])
def test_refused_up_front_in_one_line(sets, words, capsys):
    argv = ["--model", "hand", "--show-config"] + [a for kv in sets for a in ("--set", kv)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def test_a_backbone_without_the_unet_scales_is_refused_when_the_network_is_built():
    """The config checks the name only (nothing is built to validate it); building the network names the field."""
    cfg = HandConfig.from_presets("micro").replace(backbone="test_vit")  # a timm name: the config accepts it
    with pytest.raises(ZooError) as e:
        HandBiometrics(cfg)
    for w in ("backbone=test_vit", "reductions 4, 8, 16 and 32", "has feature levels at reductions 16"):
        assert w in str(e.value), (w, str(e.value))


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_pretrained_weights_load_at_fit_from_the_cache(empty_caches):
    from safetensors.torch import save_file

    model = HandBiometrics(HandConfig.from_presets("micro").replace(backbone="test_resnet", pretrained=True))
    with pytest.raises(ZooError, match="test_resnet.*not in the local cache"):  # builds without, fails at fit
        model.setup("fit")
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    snapshot = empty_caches / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    reference = timm.create_model("test_resnet")
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    model.setup("fit")
    assert torch.equal(model.net.encoder.conv1[0].weight, reference.conv1[0].weight)
    assert torch.equal(model.net.encoder.layer4[0].conv2.weight, reference.layer4[0].conv2.weight)
