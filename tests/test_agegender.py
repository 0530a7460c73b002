"""AgeGender: loss and metrics, learning on synthetic faces, backbone swap to the zoo's Mamba backbone, train.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.utkface_demo import draw_face, sample_age
from losses.multitask import AgeGenderLoss
from models.agegender.metrics import AgeGenderMetrics
from models.agegender.module import AgeGender


def test_loss_terms_and_weights():
    age_pred, age = torch.tensor([30.0, 58.0]), torch.tensor([40.0, 58.0])
    logit, gender = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0])
    l1 = AgeGenderLoss("l1", age_weight=2.0, gender_weight=0.5, max_age=100.0)(age_pred, logit, age, gender)
    assert l1["age"] == pytest.approx(0.05)  # mean |error| / max_age = (10 / 100) / 2
    assert l1["gender"] == pytest.approx(np.log(2))
    assert l1["loss"] == pytest.approx(2.0 * 0.05 + 0.5 * np.log(2))
    smooth = AgeGenderLoss("smooth_l1", max_age=100.0, beta=2.0)(age_pred, logit, age, gender)
    assert smooth["age"] == pytest.approx((0.1 - 0.01) / 2)  # linear beyond beta: |x| - beta / 2, in age / max_age


def test_metrics_overall_and_per_decade():
    metrics = AgeGenderMetrics(max_age=116)
    age = torch.tensor([5.0, 25.0, 27.0, 70.0])
    metrics.update(age + torch.tensor([1.0, 2.0, -4.0, 10.0]), torch.tensor([3.0, -3.0, 3.0, 3.0]), age,
                   torch.tensor([1.0, 0.0, 0.0, 1.0]))
    out = metrics.compute()
    assert out["age_mae"] == pytest.approx(17 / 4)
    assert out["gender_acc"] == pytest.approx(0.75) and out["gender_f1"] == pytest.approx(0.8)
    assert out["age_mae_decade_0"] == pytest.approx(1) and out["age_mae_decade_2"] == pytest.approx(3)
    assert out["age_mae_decade_7"] == pytest.approx(10) and "age_mae_decade_3" not in out  # unseen decade: absent


def face_batch(n: int, seed: int = 0, size: int = 64) -> dict[str, torch.Tensor]:
    """`n` synthetic faces (alternating genders) normalised with ImageNet's mean / std, as the datamodule does."""
    rng = np.random.default_rng(seed)
    ages = [sample_age(rng) for _ in range(n)]
    genders = [i % 2 for i in range(n)]
    images = np.stack([draw_face(a, g, int(rng.integers(0, 5)), rng, size) for a, g in zip(ages, genders)])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (torch.from_numpy(images).float() / 255 - mean) / std
    return {"image": x.permute(0, 3, 1, 2).contiguous(), "age": torch.tensor(ages, dtype=torch.float32),
            "gender": torch.tensor(genders, dtype=torch.float32)}


def _train_steps(model: AgeGender, batch: dict[str, torch.Tensor], steps: int,
                 lr: float = 1e-3) -> tuple[list[float], list[float]]:
    """Adam steps on one batch; per step, the loss and the gender accuracy of that step's forward pass."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses, accuracies = [], []
    for _ in range(steps):
        age, logit = model(batch["image"])
        loss = model.criterion(age, logit, batch["age"], batch["gender"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracies.append(((logit.detach() > 0).float() == batch["gender"]).float().mean().item())
    return losses, accuracies


def test_overfits_a_small_batch_of_demo_faces():
    torch.manual_seed(0)
    model = AgeGender(backbone="resnet10t", image_size=64, head_dropout=0.0)
    losses, accuracies = _train_steps(model, face_batch(16, size=48), steps=12)
    assert np.mean(losses[-3:]) < 0.2 * np.mean(losses[:3]), losses
    assert min(accuracies[-3:]) >= 0.9 and np.mean(accuracies[-3:]) > accuracies[0], accuracies


def test_swap_to_the_zoo_mamba_backbone_trains():
    torch.manual_seed(0)
    model = AgeGender(backbone="demansia2_micro", image_size=64)
    batch = face_batch(2)
    before = [p.detach().clone() for p in model.net.parameters()]
    losses, _ = _train_steps(model, batch, steps=2)
    assert all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.net.parameters()))  # the backbone learns


def test_train_py_fast_dev_run(tmp_path, monkeypatch):
    import train
    from datamodules.utkface import UTKFaceDataModule

    monkeypatch.setenv("ZOO_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setattr(UTKFaceDataModule, "DEMO_SIZE", 40)
    monkeypatch.setattr("zoo.trainer.CHECKPOINT_ROOT", tmp_path / "checkpoints")
    out = train.run(["--model", "agegender", "--fast-dev-run", "--logger", "none", "--progress", "none",
                     "--num-workers", "0", "--batch-size", "4"])
    metrics = out["trainer"].callback_metrics
    assert {"val/age_mae", "val/gender_acc", "val/gender_f1", "val/loss"} <= set(metrics)
    assert any(k.startswith("val/age_mae_decade_") for k in metrics)
