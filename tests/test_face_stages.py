"""The published face recipe's control flow: early stopping on validation precision@1 per stage, and stage 2
restarting from the best stage-1 checkpoint with a fresh optimiser (docs/face.md)."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from test_face_train import TINY

import train
from datamodules.lfw import LFWDataModule
from model_config import FaceConfig


class Scripted(L.Callback):
    """Records the stage and the network weights at the start of each epoch."""

    def __init__(self):
        self.stages, self.starts = [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:  # the first batch: after the module's own epoch-start hook (callbacks' hooks run first)
            return
        self.stages.append(int(pl_module.stage))
        self.starts[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lfw_stages")
    LFWDataModule(FaceConfig(), data_dir=root).make_demo(root, n_people=12, per_person=4, size=32)
    return root


def run(demo_dir, tmp_path, monkeypatch, values, *extra):
    """Train with validation precision@1 replaced by `values` (one per validation; the sanity check's first)."""
    import models.face.module
    import zoo.trainer

    real, script = models.face.module.retrieval_metrics, iter([0.0, *values])
    monkeypatch.setattr(models.face.module, "retrieval_metrics",
                        lambda emb, labels: {**real(emb, labels), "rank1": next(script)})
    zoo.trainer.CHECKPOINT_ROOT, old = tmp_path, zoo.trainer.CHECKPOINT_ROOT
    try:
        rec = Scripted()
        out = train.run(["--model", "face", "--data-dir", str(demo_dir), "--epochs", str(len(values)), "--run-name", "s",
                         *TINY, "--set", "early_stopping_patience=2", *extra], extra_callbacks=[rec])
    finally:
        zoo.trainer.CHECKPOINT_ROOT = old
    return out, rec


def test_one_stage_run_stops_after_patience_validations_without_improvement(demo_dir, tmp_path, monkeypatch):
    out, rec = run(demo_dir, tmp_path, monkeypatch, [0.5, 0.6, 0.55, 0.58, 0.9, 0.9])
    assert len(rec.stages) == 4  # epochs 2 and 3 did not beat 0.6: stopped after epoch 3, of 6
    assert out["trainer"].should_stop


def test_stage1_early_stop_hands_over_to_stage2_from_the_best_weights(demo_dir, tmp_path, monkeypatch):
    values = [0.3, 0.7, 0.5, 0.4, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    out, rec = run(demo_dir, tmp_path, monkeypatch, values, "--set", "stage2_miner=hard", "--set", "stage2_epoch=5",
                   "--set", "stage2_from_best=true", "--set", "early_stopping_patience=2")
    # Stage 1: best at epoch 1 (0.7), epochs 2 and 3 worse -> stage 2 starts at epoch 4 (not the scheduled 5) ...
    assert rec.stages[:5] == [1, 1, 1, 1, 2]
    # ... from the weights at the end of epoch 1 (the best checkpoint), which are the weights at epoch 2's start,
    best = rec.starts[2]
    assert all(torch.equal(best[k], v) for k, v in rec.starts[4].items())
    assert not all(torch.equal(best[k], v) for k, v in rec.starts[3].items())
    # ... and stage 2 runs its own length (epochs - stage2_epoch = 5) or stops early itself: 0.6 never improves on
    # itself after epoch 4, so it stops after epoch 6.
    assert len(rec.stages) == 7 and out["model"].stage.item() == 2
