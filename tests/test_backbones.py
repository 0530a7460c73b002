"""models.backbones: any timm name (the zoo's own included), pooled features, data configs, offline-only weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from models.backbones import backbone_data_config, create_backbone, local_weights
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Weight caches pointing at empty folders; any attempt to download fails the test."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    monkeypatch.setattr("torch.hub.load_state_dict_from_url", no_network)
    return tmp_path


def test_pooled_features():
    net = create_backbone("resnet10t")
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, net.num_features)


def test_unknown_name_suggests_a_close_one():
    with pytest.raises(ZooError, match="Did you mean 'resnet10t'"):
        create_backbone("resnet10tt")


def test_data_config_from_timm_and_size_override():
    data = backbone_data_config("efficientnet_b0")
    assert data["input_size"] == (3, 224, 224) and data["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert backbone_data_config("efficientnet_b0", image_size=96)["input_size"] == (3, 96, 96)


def test_pretrained_without_local_weights_is_a_zoo_error(empty_caches):
    with pytest.raises(ZooError, match=r"'efficientnet_b0' are not in the local cache.*pretrained=True"):
        create_backbone("efficientnet_b0", pretrained=True)


def test_agegender_pretrained_fails_at_fit_not_at_load(empty_caches):
    from models.agegender.module import AgeGender

    model = AgeGender(backbone="resnet10t", pretrained=True, image_size=64)  # a checkpoint opens without weights
    with pytest.raises(ZooError, match="resnet10t"):
        model.setup("fit")


def test_pretrained_loads_the_cached_file_offline(empty_caches):
    """A fake HF cache entry in the layout huggingface_hub writes: loaded as is, nothing fetched."""
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg("resnet10t")
    snapshot = empty_caches / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    reference = timm.create_model("resnet10t")  # with its classifier, as the published file has
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))

    assert local_weights("resnet10t") == snapshot / "model.safetensors"
    net = create_backbone("resnet10t", pretrained=True)
    assert torch.equal(net.conv1[0].weight, reference.conv1[0].weight)


@pytest.mark.slow  # a fresh Python process (imports torch, Lightning, timm: ~5 s before the test starts)
def test_every_zoo_backbone_is_created_by_timm_after_import_models():
    """A fresh interpreter: `import models` alone registers every task's timm names (no hand-kept module list)."""
    import subprocess
    import sys

    code = ("import models, timm, torch; names = sorted(models.TIMM_NAMES); print(' '.join(names)); "
            "[timm.create_model(n, num_classes=0) for n in names if n.endswith('micro')]")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = set(out.stdout.split())
    assert {"demansia2_micro", "demansia2_tiny", "demansia2_small", "face_mamba_micro", "face_mamba_tiny"} <= names


def test_unknown_backbone_lists_the_zoo_names():
    with pytest.raises(ZooError, match="Unknown backbone 'zoofake_micro'.*demansia2_micro.*face_mamba_micro"):
        create_backbone("zoofake_micro")


def test_zoo_mamba_backbone_is_a_timm_model():
    net = create_backbone("demansia2_micro")
    size = backbone_data_config("demansia2_micro", image_size=64)["input_size"][1]
    assert net(torch.randn(2, 3, size, size)).shape == (2, net.num_features)
