"""DeMansia 2 training through train.py: overfitting, raw + EMA validation, checkpoints, resume, the classify verb."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from crash import StopAt

import predict
import train
from datamodules.demo import jitter, prototypes
from datamodules.imagenet import ImageNetDataModule
from model_config import DeMansia2Config
from models.demansia2 import DeMansia2
from zoo.images import save_rgb

SMALL = dict(d_model=32, depth=2, attn_layers=(1,), num_heads=2, attn_head_dim=16, rotary_dim=8, d_state=8,
             headdim=16, chunk_size=16, image_size=32, patch_size=4, stem_channels=8)
SETS = [f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in SMALL.items()]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """A 10-class demo set with 3 train / 1 val images per class (the real demo has more)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ZOO_DEMO_DIR", str(tmp_path_factory.mktemp("demo")))
    mp.setattr(ImageNetDataModule, "DEMO_TRAIN_PER_CLASS", 3)
    mp.setattr(ImageNetDataModule, "DEMO_VAL_PER_CLASS", 1)
    yield
    mp.undo()


def fit(run_name: str, *extra: str) -> dict:
    return train.run(["--model", "demansia2", "--logger", "none", "--progress", "none", "--run-name", run_name,
                      "--batch-size", "8", "--num-workers", "0", *SETS, *extra])


def test_loss_falls_when_overfitting_8_images():
    torch.manual_seed(0)
    cfg = DeMansia2Config.from_presets("micro").replace(**SMALL, num_classes=4, mix_token=False)
    model = DeMansia2(config=cfg)
    protos = prototypes(4, 32, seed=0)
    rng = np.random.default_rng(0)
    x = torch.stack([torch.from_numpy(jitter(protos[i % 4], rng)).permute(2, 0, 1).float() / 255 for i in range(8)])
    batch = {"image": (x - 0.45) / 0.25, "label": torch.arange(8) % 4}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for step in range(15):
        loss = model.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_validates_raw_and_ema_and_checkpoints_the_ema(small_demo):
    out = fit("ema", "--epochs", "2", "--set=ema_decay=0.5")
    metrics = out["trainer"].callback_metrics
    for name in ("val/top1", "val/top5", "val/loss", "val/top1_raw", "val/top5_raw", "val/loss_raw"):
        assert name in metrics, name
    ckpt_path = out["run_dir"] / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    loaded = DeMansia2.load_from_checkpoint(ckpt_path)  # no other argument, CPU
    assert loaded.device.type == "cpu" and loaded.cfg.num_classes == 10
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    # the loaded model is usable as is
    loaded.eval()
    assert loaded(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resume_restores_raw_and_ema_exactly(small_demo, monkeypatch):
    # 30 images / batch 8 = 3 steps per epoch, 2 epochs; the crashed run dies at step 4 (mid second epoch) with only
    # the periodic last.ckpt (refreshed every step) left, as after a SIGKILL.
    from callbacks.final_checkpoint import CrashCheckpoint

    common = ["--epochs", "2", "--set=ema_decay=0.5", "--deterministic", "--ckpt-every-n-steps", "1"]
    full = fit("full", *common)
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="simulated crash"):
        m.setattr(CrashCheckpoint, "on_exception", lambda *a, **k: None)
        train.run(["--model", "demansia2", "--logger", "none", "--progress", "none", "--run-name", "crashed",
                   "--batch-size", "8", "--num-workers", "0", *SETS, *common], extra_callbacks=[StopAt(4)])
    last = Path(full["run_dir"]).parent / "crashed" / "last.ckpt"
    mid = torch.load(last, map_location="cpu", weights_only=True)
    assert mid["global_step"] == 4 and "current_model_state" in mid
    resumed = train.run(["--model", "demansia2", "--logger", "none", "--progress", "none", "--resume", str(last),
                         "--deterministic", "--num-workers", "0"])
    a = torch.load(full["run_dir"] / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(resumed["run_dir"] / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        assert a[key].keys() == b[key].keys()
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)


def test_classify_verb(small_demo, capsys, tmp_path):
    out = fit("cls", "--epochs", "1", "--limit-train-batches", "2")
    ckpt = out["run_dir"] / "last.ckpt"
    img = tmp_path / "img.jpg"
    save_rgb(img, jitter(prototypes(1, 40, seed=5)[0], np.random.default_rng(0)))
    capsys.readouterr()
    assert predict.main(["--ckpt", str(ckpt), "classify", str(img), str(tmp_path), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2 and results[0]["image"] == str(img)  # the file, then the folder
    top = results[0]["top"]
    assert len(top) == 5 and all(t["class"].startswith("pattern ") for t in top)
    assert abs(sum(t["prob"] for t in top)) <= 1.0 + 1e-6 and top[0]["prob"] >= top[-1]["prob"]
    assert predict.main(["--ckpt", str(ckpt), "classify", str(img), "--top-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "img.jpg" in text and "  3. pattern" in text and "%" in text
    assert predict.main(["--ckpt", str(ckpt), "classify", str(tmp_path / "missing.jpg")]) == 2


