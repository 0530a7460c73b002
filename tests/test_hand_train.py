"""The hand task end to end on demo data (micro model, 32 px): the loss falls and identity accuracy rises; the
checkpoint round-trips on the CPU; enrol + identify finds an enrolled person and answers "unknown" for an unseen one;
evaluate prints the protocol's tables; the published schedule and the open-set metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from models.hand.metrics import open_set_metrics
from models.hand.module import HandBiometrics

ARGS = ["--model", "hand", "--logger", "csv", "--progress", "none", "--set", "num_workers=0", "--set", "image_size=32",
        "--set", "aspects=dorsal right",
        "--batch-size", "16", "--set", "warmup_epochs=0", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = train.run([*ARGS, "--epochs", "8", "--run-name", "t"])  # 8 x 4 steps
    return out


def _metrics(run_dir):
    import csv

    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return rows


def test_loss_falls_and_identity_accuracy_rises(trained):
    rows = _metrics(trained["run_dir"])
    train_loss = [float(r["train/epoch_loss"]) for r in rows if r.get("train/epoch_loss")]
    val_acc = [float(r["val/identity_acc"]) for r in rows if r.get("val/identity_acc")]
    assert train_loss[-1] < 0.8 * train_loss[0], train_loss
    assert max(val_acc[-2:]) >= 0.25 and max(val_acc[-2:]) > val_acc[0], val_acc  # chance = 1/16
    model = trained["model"]
    assert 0.0 < float(model.threshold) < 1.0  # calibrated on validation
    assert len(model.cfg.identity_names) == 16 and model.cfg.identity_names[1] == "0000007"


def test_checkpoint_round_trip_on_cpu(trained):
    path = trained["run_dir"] / "last.ckpt"
    model = HandBiometrics.load_from_checkpoint(str(path), map_location="cpu").eval()
    ref = trained["model"].cpu().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), ref(x)
    for k in ("identity", "embedding", "silhouette"):
        torch.testing.assert_close(a[k], b[k])
    assert float(model.threshold) == float(ref.threshold) and model.cfg == ref.cfg


def test_enroll_identify_round_trip(trained, tmp_path, capsys):
    dm = trained["datamodule"]
    rec = dm.records_all
    folder = dm.source_dir
    by_person: dict[str, list] = {}
    for i in dm.splits["val"] + dm.splits["train"]:  # each person's first image is a validation one
        by_person.setdefault(rec[i].id, []).append(folder / rec[i].image)
    ckpt = str(trained["run_dir"] / "last.ckpt")
    gallery = tmp_path / "gallery.safetensors"
    people = sorted(by_person)[:3]
    for p in people:
        assert predict.main(["--ckpt", ckpt, "enroll", "--gallery", str(gallery), "--person", f"p{p}",
                             *map(str, by_person[p][1:])]) == 0
    assert not gallery.read_bytes().startswith(b"\x80")  # safetensors, not a pickle
    capsys.readouterr()
    enrolled = str(by_person[people[0]][0])
    unseen = tmp_path / "blank.png"
    from PIL import Image

    Image.fromarray(np.full((60, 80, 3), [20, 120, 240], np.uint8)).save(unseen)  # no hand at all
    assert predict.main(["--ckpt", ckpt, "identify", "--gallery", str(gallery), "--json", enrolled, str(unseen)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["gallery"]["person"] == f"p{people[0]}", res[0]
    assert res[1]["gallery"]["person"] == "unknown", res[1]
    assert len(res[0]["identity"]) == 3 and res[0]["gender"] in ("male", "female")
    assert predict.main(["--ckpt", ckpt, "identify", "--top-k", "2", enrolled]) == 0
    assert "identity" in capsys.readouterr().out


def test_evaluate_prints_protocol_tables(trained, capsys, tmp_path):
    ckpt = str(trained["run_dir"] / "last.ckpt")
    root = str(trained["datamodule"].root)
    assert predict.main(["--ckpt", ckpt, "evaluate", root, "--json", "--out", str(tmp_path / "hand.json")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["plots"] == [str(tmp_path / "hand_roc.png"), str(tmp_path / "hand_det.png")]
    for png in res["plots"]:  # ROC and DET curves beside the JSON
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (720, 540)
    saved = json.loads((tmp_path / "hand.json").read_text())
    assert (saved["split"], saved["images"]) == (res["split"], res["images"])
    assert set(saved["every_pair"]) == {"auc", "eer", "tar_at_far_1e-3"}
    assert res["split"] == "val" and set(res["tables"]) == {"overall", "dorsal right"}  # the run's aspect filter
    assert {"identity_acc", "identity_f1", "identity_top5", "gender_precision", "age_recall", "rank1", "mAP"} <= set(
        res["tables"]["overall"])


def test_open_set_metrics_against_hand_computed_ranks():
    # Two subjects, three images each, on a line: queries always rank their own gallery first or second.
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.2], [0.2, 0.8]])
    persons = torch.tensor([0, 0, 1, 1, 0, 1])
    m = open_set_metrics(emb, persons, draws=5)
    assert m == {"rank1": 1.0, "rank5": 1.0, "mAP": 1.0}
    swapped = torch.tensor([0, 1, 1, 0, 0, 1])  # half the labels inconsistent with the geometry
    m2 = open_set_metrics(emb, swapped, draws=20)
    assert m2["rank1"] < 1.0 and m2["rank5"] == 1.0 and m2["rank1"] <= m2["mAP"] <= 1.0


def test_open_set_metrics_count_ties_against_the_query():
    # A collapsed network (every embedding the same) finds nobody: ties must not count as hits.
    persons = torch.arange(8).repeat_interleave(3)
    m = open_set_metrics(torch.ones(24, 4), persons, draws=3)
    assert m["rank1"] == 0.0 and m["rank5"] == 0.0 and m["mAP"] == 1 / 8


def test_published_schedule_warms_up_then_steps():
    from model_config import HandConfig
    from zoo.optim import build_optimizer, build_scheduler

    cfg = HandConfig.from_presets("published").replace(num_identities=3)
    # the schedule every task gets from zoo.optim (no 44M-weight network needed to check it)
    s = build_scheduler(build_optimizer(torch.nn.Linear(1, 1), cfg), cfg, updates_per_epoch=1)
    lrs = {e: s._get_lr(e)[0] for e in (0, 5, 10, 29, 30, 69)}
    assert lrs[0] == pytest.approx(8e-6) and lrs[10] == pytest.approx(8e-4) and lrs[29] == pytest.approx(8e-4)
    assert lrs[30] == pytest.approx(4e-4) and lrs[69] == pytest.approx(4e-4) and 8e-6 < lrs[5] < 8e-4
