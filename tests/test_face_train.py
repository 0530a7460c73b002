"""Face task end to end on tiny demo identities: learning, checkpoint round trip, predict.py verbs, ArcFace weights,
the two-stage miner schedule."""
from __future__ import annotations

import json
import re

import lightning as L
import pytest
import torch

import predict
import train
from datamodules.lfw import LFWDataModule
from model_config import FaceConfig
from models.face import FaceEmbedder
from models.face.metrics import retrieval_metrics

# The patch stem: on these synthetic identities (a shared face, weak identity patterns, lighting nuisance) it shows
# learning within 8 epochs; micro's conv stem is measured on real faces instead (benchmarks/real_data.py face).
TINY = ["--set", "stem=patch", "--set", "image_size=32", "--set", "patch_size=8", "--set", "d_model=32", "--set", "depth=1",
        "--set", "d_state=8", "--set", "headdim=8", "--set", "embedding_dim=32", "--set", "augment=none",
        "--set", "warmup_epochs=0", "--set", "miner=all", "--set", "split=0.6,0.4,0.0", "--num-workers", "0", "--batch-size", "24",
        "--logger", "none", "--progress", "none"]


class Recorder(L.Callback):
    """Training losses per epoch, and the optimizer / miner / ArcFace weights seen at each epoch start."""

    def __init__(self):
        self.losses: list[list[float]] = []
        self.optimizers, self.miners, self.lrs = [], [], []
        self.weights_at_start = None

    def on_train_start(self, trainer, pl_module):
        if hasattr(pl_module.criterion.loss, "W"):
            self.weights_at_start = pl_module.criterion.loss.W.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # after the module's own epoch-start hook (callbacks' hooks run before the module's)
            self.losses.append([])
            self.optimizers.append(trainer.optimizers[0])
            self.miners.append(pl_module.criterion.miner_kind)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[-1].append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lfw_demo")
    dm = LFWDataModule(FaceConfig(), data_dir=root)
    dm.make_demo(root, n_people=20, per_person=6, size=32)
    return root


@pytest.fixture(scope="module")
def trained(demo_dir, tmp_path_factory):
    ckpt_root = tmp_path_factory.mktemp("ckpt")
    import zoo.trainer

    old, zoo.trainer.CHECKPOINT_ROOT = zoo.trainer.CHECKPOINT_ROOT, ckpt_root
    try:
        rec = Recorder()
        out = train.run(["--model", "face", "--data-dir", str(demo_dir), "--epochs", "8", "--lr", "3e-3", "--run-name", "t",
                         *TINY, "--set", "image_size=64"], extra_callbacks=[rec])
    finally:
        zoo.trainer.CHECKPOINT_ROOT = old
    return out, rec


def val_rank1(model, dm) -> float:
    ds = dm.dataset("val")
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return retrieval_metrics(model.embed(images), torch.tensor(ds.labels))["rank1"]


def test_loss_falls_and_recall_at_1_rises(trained):
    out, rec = trained
    model, dm, trainer = out["model"], out["datamodule"], out["trainer"]
    first, last = sum(rec.losses[0]) / len(rec.losses[0]), sum(rec.losses[-1]) / len(rec.losses[-1])
    assert last < 0.7 * first, (first, last)
    fresh = FaceEmbedder(config=model.cfg)
    before, after = val_rank1(fresh, dm), val_rank1(model, dm)
    n_val = {n: len(v) for n, v in dm.people["val"].items()}
    chance = (6 - 1) / (sum(n_val.values()) - 1)
    print(f"val precision@1: untrained {before:.3f}, trained {after:.3f}, chance {chance:.3f}")
    assert after > before and after > 2 * chance, (before, after, chance)
    metrics = trainer.callback_metrics
    assert {"val/rank1", "val/r_precision", "val/mean_average_precision_at_r", "val/verif_acc",
            "val/verif_auc", "val/threshold"} <= set(metrics)
    assert float(model.threshold) == pytest.approx(float(metrics["val/threshold"]))
    assert float(model.threshold) != 0.5


def test_checkpoint_round_trip_restores_threshold(trained):
    out, _ = trained
    model = out["model"]
    path = out["run_dir"] / "last.ckpt"
    loaded = FaceEmbedder.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    assert float(loaded.threshold) == pytest.approx(float(model.threshold))
    x = torch.randn(2, 3, model.cfg.image_size, model.cfg.image_size)
    assert torch.allclose(loaded.embed(x), model.embed(x), atol=1e-5)


def test_predict_verbs(trained, demo_dir, tmp_path, capsys):
    out, _ = trained
    ckpt = str(out["run_dir"] / "last.ckpt")
    a, b = sorted((demo_dir / "Ada_Arden").glob("*.jpg"))[:2]
    assert predict.main(["--ckpt", ckpt, "predict", str(a), str(b), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"similarity", "threshold", "same"} and -1 <= result["similarity"] <= 1
    assert result["threshold"] == pytest.approx(float(out["model"].threshold))

    # This run's split has no test part: the default (the identity-disjoint test split) says so and names --all.
    assert predict.main(["--ckpt", ckpt, "evaluate", str(demo_dir), "--pairs"]) == 2
    assert "holds no identity; use --all" in capsys.readouterr().err
    assert predict.main(["--ckpt", ckpt, "evaluate", str(demo_dir), "--pairs", "--all"]) == 0
    text = capsys.readouterr().out
    assert "Rank-1 (Recall@1)" in text and "MAP@R" in text and "4-fold verification" in text
    assert len(re.findall(r"^\s+[1-4]\s+-?\d\.\d{4}\s+\d\.\d{4}$", text, flags=re.M)) == 4

    html = tmp_path / "emb.html"
    assert predict.main(["--ckpt", ckpt, "visualize", str(demo_dir), "--out", str(html), "--method", "pca"]) == 0
    page = html.read_text()
    n_images = len(list(demo_dir.glob("*/*.jpg")))
    # One point per image, each with its thumbnail in customdata (plotly writes "/" as \u002f inside the JSON).
    assert len(re.findall(r"data:image(?:/|\\u002f)jpeg;base64,", page)) == n_images == 120


def test_arcface_class_weights_are_trained(demo_dir, tmp_path, monkeypatch):
    import zoo.trainer

    monkeypatch.setattr(zoo.trainer, "CHECKPOINT_ROOT", tmp_path)
    rec = Recorder()
    out = train.run(["--model", "face", "--data-dir", str(demo_dir), "--set", "metric_loss=arcface", "--max-steps", "2",
                     "--limit-val-batches", "1", *TINY], extra_callbacks=[rec])
    model = out["model"]
    assert model.criterion.loss.W.shape == (32, model.cfg.num_identities) and model.cfg.num_identities == 12
    optimised = {id(p) for g in out["trainer"].optimizers[0].param_groups for p in g["params"]}
    assert id(model.criterion.loss.W) in optimised
    assert not torch.allclose(rec.weights_at_start, model.criterion.loss.W.detach())


def test_two_stage_schedule_switches_miner_and_restarts_the_optimiser(demo_dir, tmp_path, monkeypatch):
    import zoo.trainer

    monkeypatch.setattr(zoo.trainer, "CHECKPOINT_ROOT", tmp_path)
    rec = Recorder()
    out = train.run(["--model", "face", "--data-dir", str(demo_dir), "--epochs", "2", "--limit-train-batches", "2",
                     "--limit-val-batches", "1", "--set", "miner=all", "--set", "stage2_miner=hard",
                     "--set", "stage2_epoch=1", *TINY, "--set", "warmup_epochs=1"], extra_callbacks=[rec])
    model = out["model"]
    assert rec.miners == ["all", "hard"]
    assert rec.optimizers[0] is not rec.optimizers[1]
    assert int(model.stage) == 2 and int(model.stage_start_step) == 2
    assert rec.lrs[2] == pytest.approx(rec.lrs[0])  # the warm-up starts again in stage 2
    ckpt = torch.load(out["run_dir"] / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["stage"]) == 2


def test_resume_mid_epoch_matches_uninterrupted(tmp_path, monkeypatch):
    """P x K batches, warm-up + cosine schedule and weights continue exactly after a run killed mid-epoch."""
    from crash import StopAt

    from callbacks.final_checkpoint import CrashCheckpoint

    common = TINY + ["--epochs", "2", "--set", "warmup_epochs=1", "--deterministic", "--ckpt-every-n-steps", "1"]
    full = train.run(["--model", "face", "--run-name", "face-full", *common])
    steps = full["trainer"].global_step
    stop = steps // 2 + 1  # inside the second epoch
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="simulated crash"):
        m.setattr(CrashCheckpoint, "on_exception", lambda *a, **k: None)  # a SIGKILL runs no handler
        train.run(["--model", "face", "--run-name", "face-crashed", *common], extra_callbacks=[StopAt(stop)])
    last = full["run_dir"].parent / "face-crashed" / "last.ckpt"
    resumed = train.run(["--model", "face", "--resume", str(last), "--logger", "none", "--progress", "none",
                         "--deterministic"])
    assert resumed["trainer"].global_step == steps
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")
