"""The W&B run the zoo starts passes no deprecated setting: wandb warns "The anonymous setting has no effect" for any
value of `anonymous`, which Lightning's WandbLogger sets unless told otherwise."""
from __future__ import annotations

import pytest

from zoo.trainer import RunOptions, build_logger


def test_wandb_init_gets_no_anonymous_setting(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    seen = {}

    class Stop(Exception):
        pass

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(wandb, "run", None)  # a run left by an earlier test would be reused instead of created
    monkeypatch.setattr("zoo.trainer.wandb_online_possible", lambda *a, **k: (False, "test"))
    logger = build_logger(RunOptions(model="face", run_dir=tmp_path, epochs=1), {"a": 1})
    with pytest.raises(Stop):
        logger.experiment  # noqa: B018 - creating the run calls wandb.init
    assert seen["project"] == "mamba-zoo-face" and seen["id"] == (tmp_path / "wandb_id.txt").read_text().strip()
    assert "anonymous" not in seen, seen
