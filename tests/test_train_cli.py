"""train.py: every registered model runs, and every user mistake gets one clear paragraph naming the problem and fix."""
from __future__ import annotations

import pytest
import torch

import train
from model_config import REGISTRY, parse_value
from zoo.errors import ZooError

DESIGN_TASKS = {"demansia2", "hand", "agegender", "face", "palm"}


def _error(capsys, argv) -> str:
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_planned_model_says_it_is_not_available(capsys, monkeypatch):
    """A registered model whose status is "planned" is refused with the list of ready ones (every ready model is
    trained by tests/test_registry_models.py)."""
    import dataclasses

    import model_config

    monkeypatch.setitem(model_config.REGISTRY, "future", dataclasses.replace(
        REGISTRY["demansia2"], name="future", status="planned", planned_note="it lands later."))
    err = _error(capsys, ["--model", "future", "--fast-dev-run", "--logger", "none", "--progress", "none"])
    assert "'future' is not available yet: it lands later." in err and "Ready models:" in err


def test_list_prints_one_line_per_model_with_parameter_counts(capsys):
    train.run(["--list"])
    out = capsys.readouterr().out
    for name in DESIGN_TASKS:
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert "presets: micro" in out and "M |" in out


def test_unknown_model_lists_valid_ones(capsys):
    err = _error(capsys, ["--model", "demansia3"])
    assert "Unknown model 'demansia3'" in err and "Did you mean 'demansia2'" in err
    for name in DESIGN_TASKS:
        assert name in err


def test_bad_set_key_lists_valid_keys(capsys):
    err = _error(capsys, ["--model", "demansia2", "--set", "d_modle=64", "--show-config"])
    assert "Unknown key 'd_modle'" in err and "Did you mean 'd_model'" in err and "ema_decay" in err


@pytest.mark.parametrize("pair, words", [
    ("d_model=big", "expected int"),
    ("ema=maybe", "expected a boolean"),
    ("scan_mode=sideways", "must be one of bidirectional, legacy"),
    ("betas=0.9", "expected 2 comma-separated values"),
    ("lr", "--set expects key=value"),
])
def test_bad_set_value_names_key_and_type(capsys, pair, words):
    err = _error(capsys, ["--model", "demansia2", "--set", pair, "--show-config"])
    assert words in err


def test_set_parses_types(capsys):
    out = train.run(["--model", "demansia2", "--show-config", "--set", "attn_layers=1,3", "--set", "ema=false",
                     "--set", "token_label_dir=none", "--set", "lr=3e-4", "--epochs", "2", "--preset", "micro,published"])
    cfg = out["config"]
    assert cfg.attn_layers == (1, 3) and cfg.ema is False and cfg.token_label_dir is None
    assert cfg.lr == 3e-4 and cfg.epochs == 2 and cfg.scan_mode == "legacy"  # published applied after micro
    assert parse_value("none", int | None) is None and parse_value("7", int | None) == 7


def test_unknown_preset(capsys):
    err = _error(capsys, ["--model", "demansia2", "--preset", "huge", "--show-config"])
    assert "Unknown preset 'huge'" in err and "micro" in err and "published" in err


def test_missing_data_dir(capsys, tmp_path):
    err = _error(capsys, ["--model", "demansia2", "--data-dir", str(tmp_path / "nope"), "--fast-dev-run"])
    assert str(tmp_path / "nope") in err and "does not exist" in err and "demo data" in err


def test_checkpoint_of_another_model(toy_registered, capsys):
    out = train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "2"])
    ckpt = out["run_dir"] / "last.ckpt"
    err = _error(capsys, ["--model", "demansia2", "--resume", str(ckpt)])
    assert "holds a 'toy' model" in err and "--model toy" in err
    from zoo.module import ZooModule

    class Other(ZooModule):
        TASK = "other"

    with pytest.raises(ZooError, match="holds a 'toy' model, not a 'other' model"):
        Other.load_from_checkpoint(str(ckpt))


def test_corrupt_checkpoint(toy_registered, capsys, tmp_path):
    out = train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "2"])
    good = (out["run_dir"] / "last.ckpt").read_bytes()
    bad = out["run_dir"] / "truncated.ckpt"
    bad.write_bytes(good[: len(good) // 2])
    err = _error(capsys, ["--model", "toy", "--resume", str(bad)])
    assert "Cannot read checkpoint" in err and "truncated.ckpt" in err and "last.ckpt" in err
    err = _error(capsys, ["--model", "toy", "--resume", str(tmp_path / "missing.ckpt")])
    assert "Checkpoint not found" in err


def test_resume_last_without_runs(toy_registered, capsys):
    err = _error(capsys, ["--model", "toy", "--resume", "last"])
    assert "no run of 'toy' has a last.ckpt" in err


def test_validate_with_ckpt(toy_registered):
    out = train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "12"])
    res = train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--validate",
                     "--ckpt", str(out["run_dir"] / "last.ckpt")])
    assert "val/acc" in res["results"][0] and res["results"][0]["val/acc"] > 0.5


def test_checkpoint_opens_with_load_from_checkpoint_on_cpu(toy_registered):
    from toy_task import ToyModule

    out = train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "4",
                     "--set", "hidden=24"])
    model = ToyModule.load_from_checkpoint(str(out["run_dir"] / "last.ckpt"))  # no other argument
    assert model.cfg.hidden == 24 and model.device == torch.device("cpu")
    x = torch.randn(5, 4)
    torch.testing.assert_close(model.eval()(x), out["model"].eval()(x))


def test_wandb_offline_without_key_or_network(toy_registered, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = train.run(["--model", "toy", "--progress", "none", "--max-steps", "3", "--run-name", "wb"])
    printed = capsys.readouterr().out
    assert "W&B offline" in printed and "wandb sync" in printed
    runs = list((out["run_dir"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), "offline run directory with its .wandb log"
    assert (out["run_dir"] / "wandb_id.txt").read_text().strip()


def test_worker_error_is_printed_without_the_worker_traceback(toy_registered, capsys, monkeypatch):
    """A ZooError raised inside a DataLoader worker reaches the user as our paragraph alone."""
    import toy_task

    def broken(self, i):
        raise ZooError(f"Cannot read image /data/img_{i}.jpg: truncated. Delete or replace it.")

    monkeypatch.setattr(toy_task.ToyDataset, "__getitem__", broken)
    err = _error(capsys, ["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "1",
                          "--num-workers", "1"])
    assert err.startswith("error: Cannot read image /data/img_") and "Original Traceback" not in err


@pytest.mark.parametrize("flag,batches,run", [("1", 1, 1), ("3", 3, 3), ("1.0", 1.0, 3), ("0.5", 0.5, 1)])
def test_limit_batches_counts_an_integer_and_takes_a_fraction_with_a_point(toy_registered, flag, batches, run):
    """As in Lightning's own CLI: `--limit-val-batches 1` is one batch (the toy's validation set has 3 of 8),
    `1.0` all of them."""
    out = train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "1",
                     "--limit-train-batches", flag, "--limit-val-batches", flag])
    trainer = out["trainer"]
    assert trainer.limit_val_batches == batches and type(trainer.limit_val_batches) is type(batches)
    assert trainer.num_val_batches == [run]
