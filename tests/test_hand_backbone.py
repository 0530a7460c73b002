"""Hand on any timm backbone (`--set backbone=NAME`): its levels at reductions 4-32 projected to the VMamba dims, the
same outputs, training, checkpoints and pretrained weights from the cache; a backbone without those levels is refused.
Also the hand and palm floors of benchmarks/real_data.py on fixtures with known answers."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import timm
import torch

import train
from datamodules.hands11k import HandItem
from model_config import HandConfig, PalmConfig
from models.hand.metrics import open_set_metrics
from models.hand.model import HandNet
from models.hand.module import HandBiometrics
from zoo.errors import ZooError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import real_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--model", "hand", "--logger", "none", "--progress", "none", "--set", "num_workers=0", "--set",
        "image_size=32", "--set", "aspects=dorsal right", "--batch-size", "16", "--set", "warmup_epochs=0"]


@pytest.mark.parametrize("preset", ["micro", "published"])
def test_timm_backbone_gives_the_vmamba_outputs(preset):
    cfg = HandConfig.from_presets(preset).replace(encoder="micro", image_size=64, num_identities=5)
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
    (["backbone=test_vit"], ["backbone=test_vit", "reductions 4, 8, 16 and 32", "has feature levels at reductions 16"]),
    (["backbone=resnet10tt"], ["Unknown backbone 'resnet10tt'", "resnet10t"]),
    (["pretrained=true"], ["pretrained=True", "timm backbone", "pretrained_ckpt"]),
    (["backbone=test_resnet", "pretrained_ckpt=v0.pth"], ["pretrained_ckpt=v0.pth", "backbone=vmamba"]),
])
def test_refused_up_front_in_one_line(sets, words, capsys):
    argv = ["--model", "hand", "--show-config"] + [a for kv in sets for a in ("--set", kv)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


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


# ----- the floors of benchmarks/real_data.py -----
def _items(persons, aspects, genders, ages):
    return [HandItem(f"{i}.jpg", -1, g, a, p, s) for i, (p, s, g, a) in enumerate(zip(persons, aspects, genders, ages))]


def test_hand_floor_known_values_and_random_embeddings():
    # aspect 0: subjects 0, 0, 0, 1, 1, 2 (3 in the gallery, 3 queries); aspect 1: subjects 0, 3 (no query)
    persons, aspects = [0, 0, 0, 1, 1, 2, 0, 3], [0, 0, 0, 0, 0, 0, 1, 1]
    floor = real_data.hand_floor(_items(persons, aspects, [0, 1, 1, 1, 0, 1, 1, 0], [2, 2, 3, 4, 2, 5, 2, 1]))
    assert floor["test/rank1"] == pytest.approx(1 / 3)
    assert floor["test/mAP"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert floor["test/gender_acc"] == pytest.approx(5 / 8) and floor["test/age_acc"] == pytest.approx(4 / 8)
    assert floor["majority subject (rank-1)"] == pytest.approx(2 / 3)  # always "subject 0": 2 of the 3 queries
    # The chance figures are what the module's own retrieval metric gives random embeddings, on average.
    p, a = torch.tensor(persons), torch.tensor(aspects)
    g = torch.Generator().manual_seed(0)
    runs = [open_set_metrics(torch.randn(8, 16, generator=g), p, a, draws=1, seed=i) for i in range(600)]
    assert np.mean([r["rank1"] for r in runs]) == pytest.approx(1 / 3, abs=0.04)
    assert np.mean([r["mAP"] for r in runs]) == pytest.approx(floor["test/mAP"], abs=0.03)


def test_hand_floor_pools_the_aspects_when_none_has_a_query():
    floor = real_data.hand_floor(_items([0, 0, 1, 2], [0, 1, 1, 1], [0] * 4, [0] * 4))  # pooled: 3 subjects, 1 query
    assert floor["test/rank1"] == pytest.approx(1 / 3) and floor["majority subject (rank-1)"] == 1.0


def test_raw_pixel_floor_finds_near_duplicate_photos():
    g = torch.Generator().manual_seed(0)
    faces = torch.randn(4, 3, 32, 32, generator=g)  # one look per subject; two photos each, slightly different
    images = [faces[p] + 0.05 * torch.randn(3, 32, 32, generator=g) for p in (0, 0, 1, 1, 2, 2, 3, 3)]
    items = _items([0, 0, 1, 1, 2, 2, 3, 3], [0] * 8, [0] * 8, [0] * 8)
    ds = type("DS", (), {"items": items, "__len__": lambda self: 8, "__getitem__": lambda self, i: {"image": images[i]}})()
    floor = real_data.raw_pixel_retrieval(ds, draws=3, seed=0)
    assert floor["raw-pixel cosine (rank-1)"] == 1.0 and floor["raw-pixel cosine (mAP)"] == 1.0
    images[1] = faces[1].clone()  # subject 0's query now looks like subject 1
    assert real_data.raw_pixel_retrieval(ds, draws=3, seed=0)["raw-pixel cosine (rank-1)"] < 1.0


@pytest.fixture
def palm_data():
    cfg = PalmConfig.from_presets("micro").replace(image_size=16, num_workers=0, seed=3)
    g = torch.Generator().manual_seed(1)
    images = {"train": torch.rand(6, 3, 16, 16, generator=g), "test": torch.rand(5, 3, 16, 16, generator=g)}
    batches = lambda x: [(x[i:i + 2], torch.zeros(len(x[i:i + 2]))) for i in range(0, len(x), 2)]  # noqa: E731
    dm = SimpleNamespace(cfg=cfg, test_dataloader=lambda: batches(images["test"]), dataset=lambda split: split,
                         loader=lambda split, train: batches(images[split]))
    return dm, images


def test_palm_floor_is_the_loss_of_a_zero_output(palm_data):
    from models.palm.module import PalmDiffusion

    dm, images = palm_data
    floor = real_data.palm_floor(dm)
    diffusion = PalmDiffusion(config=dm.cfg).diffusion
    total = 0.0
    for b, (x, _) in enumerate(dm.test_dataloader()):  # fixed_loss's draws, the pred_v target, the SNR weights
        g = torch.Generator().manual_seed(dm.cfg.seed * 100_003 + b)
        t = torch.randint(0, diffusion.num_timesteps, (len(x),), generator=g)
        noise = torch.randn(x.shape, generator=g)
        target = diffusion.predict_v(x * 2 - 1, t, noise)
        total += float((diffusion.loss_weight[t] * target.pow(2).mean(dim=(1, 2, 3))).sum())
    assert floor["test/loss"] == pytest.approx(total / len(images["test"]), rel=1e-5)
    assert 0 < floor["best constant output, fitted on train (loss)"] < floor["test/loss"] * 1.5


def test_best_constant_is_the_weighted_mean_target(palm_data):
    from models.palm.module import PalmDiffusion

    dm, images = palm_data
    module = PalmDiffusion(config=dm.cfg)
    diffusion = module.diffusion
    batches, seeds = dm.loader("train", train=False), [11, 12, 13]
    best = real_data.best_constant(module, diffusion, batches, seeds)
    weights, targets = [], []
    for (x, _), s in zip(batches, seeds):
        g = torch.Generator().manual_seed(s)
        t = torch.randint(0, diffusion.num_timesteps, (len(x),), generator=g)
        targets.append(diffusion.predict_v(x * 2 - 1, t, torch.randn(x.shape, generator=g)))
        weights.append(diffusion.loss_weight[t])
    w, target = torch.cat(weights), torch.cat(targets)
    torch.testing.assert_close(best, (w[:, None, None, None] * target).sum(0) / w.sum(), rtol=1e-4, atol=1e-5)
    diffusion.model.value.requires_grad_(True)
    (grad,) = torch.autograd.grad(real_data.mean_fixed_loss(module, diffusion, batches, seeds), diffusion.model.value)
    assert grad.abs().max() < 1e-5  # a minimum
