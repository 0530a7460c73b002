"""What real datasets bring: PGM faces (ORL), pairs files with missing images or a one-number header, the people
layout scored on its test identities, the trivial age/gender baseline, the preset that follows the data, timm
networks in place of DeMansia 2, and pretrained / init_from weights (offline)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.lfw_pairs import load_pairs
from model_config import AgeGenderConfig, DeMansia2Config, FaceConfig, get_entry
from zoo.errors import ZooError
from zoo.images import load_rgb, save_rgb
from zoo.verification import CALIBRATION_FOLD, best_threshold, kfold_verification


def write_orl(root, people: int = 6, per_person: int = 4, size=(23, 28)):
    """ORL's layout: s<k>/<n>.pgm, 8-bit grayscale PGM, one folder per person (here with a .PGM in upper case)."""
    rng = np.random.default_rng(0)
    for k in range(1, people + 1):
        base = rng.integers(0, 255, size[::-1])
        for n in range(1, per_person + 1):
            ext = "PGM" if n == 1 else "pgm"
            noisy = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
            (root / f"s{k}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy, mode="L").save(root / f"s{k}" / f"{n}.{ext}", format="PPM")


def test_orl_pgm_faces_are_a_people_layout(tmp_path):
    from datamodules.lfw import LFWDataModule

    write_orl(tmp_path)
    assert load_rgb(tmp_path / "s1" / "1.PGM").shape == (28, 23, 3)
    dm = LFWDataModule(FaceConfig.from_presets("micro").replace(split=(0.5, 0.25, 0.25), num_workers=0), tmp_path)
    dm.setup("fit")
    assert dm.layout.kind == "people" and sum(len(p) for p in dm.people.values()) == 6
    assert dm.pair_set is None
    images, labels = next(iter(dm.val_dataloader()[0]))
    assert images.shape[1:] == (3, 64, 64)


def write_people(root, counts: dict[str, int]):
    for name, n in counts.items():
        for i in range(1, n + 1):
            save_rgb(root / name / f"{name}_{i:04d}.jpg", np.full((8, 8, 3), 10 * i, np.uint8))


PAIRS_1 = "2\nA_a 1 2\nB_b 1 2\nA_a 1 B_b 1\nC_c 1 A_a 2\n"
DEV_TRAIN = "2\nC_c 1 2\nA_a 2 3\nB_b 2 C_c 2\nA_a 3 C_c 1\n"


def test_pairs_file_none_disables_pairs_and_auto_finds_them(tmp_path):
    from datamodules.lfw import LFWDataModule

    write_people(tmp_path, {n: 3 for n in ("A_a", "B_b", "C_c", "D_d", "E_e")})
    (tmp_path / "pairs.txt").write_text("1 2\n" + PAIRS_1.split("\n", 1)[1])
    cfg = FaceConfig.from_presets("micro").replace(split=(0.6, 0.2, 0.2), num_workers=0)
    dm = LFWDataModule(cfg, tmp_path)
    dm.setup("fit")
    assert len(dm.pairs) == 4
    off = cfg.with_overrides(["pairs_file=none"])
    dm = LFWDataModule(off, tmp_path)
    dm.setup("fit")
    assert dm.pairs == [] and dm.pair_set is None and len(dm._eval_loaders("val")) == 1


def test_one_fold_file_takes_its_threshold_from_dev_train_beside_it(tmp_path):
    write_people(tmp_path, {"A_a": 3, "B_b": 2, "C_c": 2})
    (tmp_path / "pairsDevTest.txt").write_text(PAIRS_1)
    (tmp_path / "pairsDevTrain.txt").write_text(DEV_TRAIN)
    ps = load_pairs(tmp_path / "pairsDevTest.txt", tmp_path)
    assert len(ps.scored) == 4 and len(ps.pairs) == 8
    assert [p.fold for p in ps.pairs[4:]] == [CALIBRATION_FOLD] * 4
    assert "threshold from pairsDevTrain.txt (4 pairs)" in ps.note
    # scored pairs alone would choose ~0.65 (perfect); the calibration pairs put it between 0.85 and 0.9.
    scores = np.array([0.7, 0.95, 0.6, 0.3, 0.95, 0.9, 0.85, 0.1])
    same = np.array([p.same for p in ps.pairs])
    res = kfold_verification(scores, same, np.array([p.fold for p in ps.pairs]))
    assert 0.85 < res.thresholds[0] < 0.9 and res.accuracies == [0.75]  # 0.7 is called "different"
    # scoring pairsDevTrain.txt itself never calibrates on itself: cross-validation inside the file
    assert "cross-validation inside the file" in load_pairs(tmp_path / "pairsDevTrain.txt", tmp_path).note


def test_one_fold_without_dev_train_cross_validates_inside_the_file():
    rng = np.random.default_rng(0)
    same = np.array([True] * 30 + [False] * 30)
    scores = np.where(same, 0.7, 0.3) + rng.normal(0, 0.2, 60)
    res = kfold_verification(scores, same, np.zeros(60, int))
    assert len(res.thresholds) == 10
    inner = np.arange(60) % 10
    for k, thr in enumerate(res.thresholds):  # each threshold comes from the other nine sub-folds only
        assert thr == pytest.approx(best_threshold(scores[inner != k], same[inner != k])[0])


def test_face_evaluate_scores_the_test_identities_by_default(tmp_path, capsys):
    from datamodules.splits import seeded_split
    from models.face.module import FaceEmbedder
    from models.face.verbs import COMMANDS

    names = [f"P_{i}" for i in range(10)]
    write_people(tmp_path, {n: 3 for n in names})
    cfg = FaceConfig.from_presets("micro").replace(split=(0.6, 0.2, 0.2), seed=3)
    model = FaceEmbedder(cfg)
    evaluate = next(c for c in COMMANDS if c.name == "evaluate")
    out = tmp_path.parent / f"{tmp_path.name}-eval" / "face.json"
    args = argparse.Namespace(folder=str(tmp_path), split="test", all=False, min_images=2, pairs=None,
                              batch_size=16, json=True, out=str(out))
    assert evaluate.run(model, args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identities"] == len(seeded_split(names, (0.6, 0.2, 0.2), 3)["test"]) == 2
    assert "test split" in result["scope"]
    # the JSON and its ROC and DET curves, beside it
    assert json.loads(out.read_text())["every_pair"] == result["every_pair"]
    assert result["plots"] == [str(out.with_name("face_roc.png")), str(out.with_name("face_det.png"))]
    for png in result["plots"]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == (720, 540)
    args.all, args.out = True, None
    evaluate.run(model, args)
    assert json.loads(capsys.readouterr().out)["identities"] == 10


def test_agegender_prints_its_trivial_baseline(tmp_path, capsys):
    from datamodules.utkface import UTKFaceDataModule

    for i in range(20):
        save_rgb(tmp_path / f"{10 + 3 * i}_{i % 2}_0_2017{i:010d}.jpg.chip.jpg", np.zeros((8, 8, 3), np.uint8))
    dm = UTKFaceDataModule(AgeGenderConfig.from_presets("micro").replace(stratify=False, num_workers=0), tmp_path)
    dm.setup("fit")
    out = capsys.readouterr().out
    base = dm.baseline("val")
    assert "trivial predictor" in out and f"val age MAE {base['age_mae']:.2f} years" in out
    assert "test age MAE" in out


def test_the_preset_follows_the_data(tmp_path):
    from datamodules.demo import mark_demo
    from train import build_parser, resolve_config

    mark_demo(tmp_path)  # a demo set written to a folder keeps the demo's preset
    args = build_parser().parse_args(["--model", "face", "--data-dir", str(tmp_path)])
    resolve_config(args, get_entry("face"), None)
    assert args.preset == "micro"

    for model, with_data, without in (("face", "tiny", "micro"), ("demansia2", "tiny", "micro"),
                                      ("agegender", "micro", "micro")):
        args = build_parser().parse_args(["--model", model, "--data-dir", "/somewhere"])
        resolve_config(args, get_entry(model), None)
        assert args.preset == with_data, model
        args = build_parser().parse_args(["--model", model])
        resolve_config(args, get_entry(model), None)
        assert args.preset == without, model


def test_demansia2_task_trains_any_timm_backbone():
    from models.demansia2.module import DeMansia2

    model = DeMansia2(DeMansia2Config.from_presets("micro").replace(backbone="test_resnet", num_classes=4,
                                                                    image_size=32, ema=False))
    assert not model.is_demansia
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3])}
    model.log = lambda *a, **k: None
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    assert model(batch["image"]).shape == (4, 4)
    with pytest.raises(ZooError, match="token_label_dir"):
        DeMansia2(DeMansia2Config.from_presets("micro").replace(backbone="test_resnet", token_label_dir="/x"))
    with pytest.raises(ZooError, match="Unknown backbone"):
        DeMansia2(DeMansia2Config.from_presets("micro").replace(backbone="resnet_nope"))


# ----- weights: pretrained downloads, offline cache, init_from another task's checkpoint -----
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_pretrained_offline_and_not_cached_says_what_is_missing(empty_caches, monkeypatch):
    from models.backbones import create_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ZooError, match=r"'resnet10t' are not in the local cache.*HF_HUB_OFFLINE=1 forbids"):
        create_backbone("resnet10t", pretrained=True)


def test_pretrained_online_downloads_through_timm_and_a_failure_is_one_clear_error(empty_caches, monkeypatch):
    import timm

    from models.backbones import create_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def fake_create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        if pretrained:
            raise OSError("Connection refused")
        return real_create(name, pretrained=False, **kwargs)

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", fake_create)
    with pytest.raises(ZooError, match=r"Could not download .*'resnet10t': OSError: Connection refused.*local cache"):
        create_backbone("resnet10t", pretrained=True)
    assert ("resnet10t", True) in calls


def test_init_from_a_demansia2_checkpoint(tmp_path):
    import timm

    from models.backbones import init_from_checkpoint
    from models.demansia2.module import DeMansia2

    source = DeMansia2(DeMansia2Config.from_presets("micro"))
    path = tmp_path / "demansia2.ckpt"
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": {"task": "demansia2"}}, path)
    net = timm.create_model("demansia2_micro", num_classes=0)
    report = init_from_checkpoint(net, path)
    assert "initialised" in report
    for k, v in net.state_dict().items():
        if ("net." + k) in source.state_dict():
            assert torch.equal(v, source.state_dict()["net." + k]), k
    with pytest.raises(ZooError, match="no tensor of that 'demansia2' checkpoint fits"):
        init_from_checkpoint(timm.create_model("resnet10t", num_classes=0), path)
