"""The floors of benchmarks/real_data.py (what a trained model must beat) on fixtures with known answers, and its
mean +- sd summary of several seeds."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.hands11k import HandItem
from model_config import FaceConfig, PalmConfig
from models.hand.metrics import open_set_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import real_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summary_of_seeds():
    assert real_data.summarise([]) == "-" and real_data.summarise([0.5]) == "0.500"
    assert real_data.summarise([1.0, 2.0, 3.0]) == "2.000 +- 1.000"  # sample standard deviation
    assert real_data.summarise([10, 20], ".1f") == "15.0 +- 7.1"


def test_face_floor_scores_raw_pixels_and_the_pairs_protocol(tmp_path):
    from datamodules.lfw import LFWDataModule

    cfg = FaceConfig.from_presets("micro").replace(num_workers=0, image_size=32)
    dm = LFWDataModule(cfg, data_dir=tmp_path)
    dm.make_demo(tmp_path, n_people=12, per_person=4, size=32)
    dm.setup("test")
    floor = real_data.floor("face", dm)
    test = dm.dataset("test")
    assert {"test/rank1", "test/r_precision", "test/verif_acc"} <= set(floor)
    # The demo's identities are distinct patterns: raw pixels already find and verify them well above chance.
    assert floor["test/rank1"] > 1 / len(set(test.labels)) and floor["test/verif_acc"] > 0.6
    same = np.mean([p.same for p in dm.pairs])
    assert floor["verification, always the majority answer"] == pytest.approx(max(same, 1 - same))


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
    diffusion = PalmDiffusion(config=dm.cfg).net
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
    diffusion = module.net
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
