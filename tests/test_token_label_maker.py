"""Token labels made by a teacher: LV-ViT's file format, the teacher's dense scores, resumable runs, class checks,
bad images, and a round trip through the unchanged training pipeline (`token_label_dir`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from losses.token_labeling import smooth, token_label_targets
from models.demansia2.token_labels import (
    Teacher,
    dense_logits,
    label_path,
    load_teacher,
    make_token_labels,
    teacher_from_timm,
    training_images,
)
from zoo.errors import ZooError

CLASSES = [f"c{k}" for k in range(6)]


def image_folder(root: Path, classes=CLASSES, per_class: int = 2, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            for j in range(per_class):
                path = root / split / c / f"{c}_{j}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(path, "JPEG")
    return root


def resnet_teacher(num_classes: int = len(CLASSES)) -> Teacher:
    torch.manual_seed(0)
    return teacher_from_timm("test_resnet", num_classes=num_classes, image_size=64)


def reference_scores(teacher: Teacher, path: Path) -> torch.Tensor:
    """The teacher's classifier at every cell of its last feature map, computed by hand: (K, h, w)."""
    x = teacher.transform()(Image.open(path).convert("RGB"))[None]
    net = teacher.net
    with torch.no_grad():
        feats = net.forward_features(x)[0]  # (C, h, w)
        return torch.einsum("kc,chw->khw", net.fc.weight, feats) + net.fc.bias[:, None, None]


def test_labels_are_the_teachers_top5_in_lvvit_format(tmp_path):
    data = image_folder(tmp_path / "data")
    teacher = resnet_teacher()
    result = make_token_labels(teacher, data, tmp_path / "labels", batch_size=5, progress=False)
    images, classes = training_images(data)
    assert classes == CLASSES and result["written"] == len(images) == 12 and not result["failed"]
    for path, _ in images:
        label = torch.load(label_path(tmp_path / "labels", path), weights_only=True)
        assert label.dtype == torch.float16 and label.shape == (2, 5, 2, 2)
        assert label_path(tmp_path / "labels", path) == tmp_path / "labels" / path.parent.name / f"{path.stem}.pt"
        ref = reference_scores(teacher, path)
        values, indices = ref.topk(5, dim=0)
        torch.testing.assert_close(label[0].float(), values, atol=2e-3, rtol=2e-3)
        assert torch.equal(label[1].long(), indices)


def test_runs_resume_and_rewrite_only_what_is_missing(tmp_path):
    data = image_folder(tmp_path / "data")
    teacher = resnet_teacher()
    make_token_labels(teacher, data, tmp_path / "labels", progress=False)
    victim = tmp_path / "labels" / "c3" / "c3_1.pt"
    before = victim.read_bytes()
    victim.unlink()
    other = tmp_path / "labels" / "c0" / "c0_0.pt"
    mtime = other.stat().st_mtime_ns
    result = make_token_labels(teacher, data, tmp_path / "labels", progress=False)
    assert (result["written"], result["skipped"]) == (1, 11)
    assert victim.read_bytes() == before and other.stat().st_mtime_ns == mtime
    assert not list((tmp_path / "labels").rglob("*.tmp"))


def test_class_count_mismatch_is_refused_with_both_counts(tmp_path):
    data = image_folder(tmp_path / "data")
    with pytest.raises(ZooError, match=r"test_resnet has 7 classes but the dataset has 6 class folders"):
        make_token_labels(resnet_teacher(7), data, tmp_path / "labels", progress=False)
    assert not (tmp_path / "labels").exists()


def test_an_imagenet_teacher_is_restricted_to_the_sets_wnids(tmp_path):
    wnids = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916"]  # Imagenette's first six
    data = image_folder(tmp_path / "data", classes=wnids, per_class=1)
    teacher = resnet_teacher(1000)
    make_token_labels(teacher, data, tmp_path / "labels", progress=False)
    from timm.data import ImageNetInfo

    teacher_index = [ImageNetInfo().label_names().index(w) for w in wnids]
    path = data / "train" / wnids[2] / f"{wnids[2]}_0.JPEG"
    label = torch.load(label_path(tmp_path / "labels", path), weights_only=True)
    ref = reference_scores(teacher, path)[teacher_index]  # the six classes' scores, in dataset order
    values, indices = ref.topk(5, dim=0)
    assert torch.equal(label[1].long(), indices)
    torch.testing.assert_close(label[0].float(), values, atol=2e-3, rtol=2e-3)


def test_an_unreadable_image_is_reported_and_the_rest_labelled(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    (data / "train" / "c1" / "c1_0.JPEG").write_bytes(b"")
    result = make_token_labels(resnet_teacher(), data, tmp_path / "labels", progress=False)
    assert result["written"] == 11 and len(result["failed"]) == 1
    err = capsys.readouterr().err
    assert "c1_0.JPEG" in err and "1 unreadable" in err
    assert not (tmp_path / "labels" / "c1" / "c1_0.pt").exists()


def test_dense_scores_of_other_teachers_pool_to_their_logits():
    """A CNN with a linear head: the mean of the dense map is the network's own logits; DeMansia 2: its aux head on
    every patch token."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    net = timm.create_model("test_resnet", num_classes=9).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense_logits(net, x).mean((2, 3)), net(x), atol=1e-5, rtol=1e-5)
        import models  # noqa: F401

        dm = timm.create_model("demansia2_micro", num_classes=9).eval()
        dense = dense_logits(dm, x)
        _, tokens = dm.split_tokens(dm.forward_features(x))
        torch.testing.assert_close(dense.flatten(2).transpose(1, 2), dm.aux_head(tokens))
        assert dense.shape == (2, 9, *dm.token_grid(x))


def test_round_trip_targets_are_the_teachers_scores_at_the_crop(tmp_path):
    """Labels made here, read by the training dataset and turned into targets: a crop box on one label cell gives
    the class-token target softmax(teacher's top-5 scores at that cell, zeros elsewhere), smoothed."""
    from datamodules.imagenet import ImageNetDataModule
    from model_config import DeMansia2Config

    data = image_folder(tmp_path / "data")
    teacher = resnet_teacher()
    make_token_labels(teacher, data, tmp_path / "labels", progress=False)
    cfg = DeMansia2Config.from_presets("micro").replace(token_label_dir=str(tmp_path / "labels"), image_size=32,
                                                          num_workers=0, batch_size=4)
    dm = ImageNetDataModule(cfg, data_dir=data)
    dm.setup("fit")
    ds = dm.train_dataset()
    path = ds.index.samples[5][0]
    label_map = ds.load_label_map(path)[None]
    box = torch.tensor([[1.0, 0.0, 2.0, 1.0]])  # cell (row 0, column 1) of the 2x2 map
    cls, tokens = token_label_targets(label_map, box, torch.tensor([False]), len(CLASSES), (2, 2), smoothing=0.1)
    ref = reference_scores(teacher, path)[:, 0, 1]
    top = torch.zeros_like(ref).scatter(0, ref.topk(5).indices, ref.topk(5).values)
    expected = smooth(top.softmax(-1), 0.1)
    torch.testing.assert_close(cls[0], expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(tokens[0], expected.expand(4, -1), atol=2e-3, rtol=2e-3)


def test_a_zoo_checkpoint_teacher_and_the_predict_verb(tmp_path):
    """A DeMansia 2 run's checkpoint makes labels through `predict.py ... token-labels`; they train DeMansia 2."""
    import predict
    import train

    data = image_folder(tmp_path / "data", per_class=4, size=32)
    common = ["--model", "demansia2", "--preset", "micro", "--data-dir", str(data), "--logger", "none", "--progress", "none",
              "--epochs", "1", "--max-steps", "2", "--num-workers", "0", "--set", "batch_size=8",
              "--set", "image_size=32"]
    out = train.run([*common, "--run-name", "teacher"])
    ckpt = Path(out["trainer"].checkpoint_callback.last_model_path)
    assert predict.main(["--ckpt", str(ckpt), "token-labels", str(data), "--out", str(tmp_path / "labels")]) == 0
    labels = sorted((tmp_path / "labels").rglob("*.pt"))
    assert len(labels) == 24
    label = torch.load(labels[0], weights_only=True)
    assert label.shape[:2] == (2, 5) and label[1].max() < len(CLASSES)
    assert load_teacher(str(ckpt)).num_classes == len(CLASSES)
    # `--set teacher=CKPT` finds every label there (resumable: nothing rewritten) and trains on them.
    stamp = labels[0].stat().st_mtime_ns
    student = train.run([*common, "--run-name", "student", "--set", f"token_label_dir={tmp_path / 'labels'}",
                         "--set", f"teacher={ckpt}"])
    assert np.isfinite(float(student["trainer"].callback_metrics["train/loss"]))
    assert labels[0].stat().st_mtime_ns == stamp


def test_teacher_without_a_label_dir_uses_a_cache_folder_per_teacher_and_data(tmp_path, monkeypatch):
    from datamodules.imagenet import ImageNetDataModule
    from model_config import DeMansia2Config

    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    data = image_folder(tmp_path / "data", per_class=1)
    cfg = DeMansia2Config.from_presets("micro").replace(teacher="test_resnet", num_workers=0)
    dm = ImageNetDataModule(cfg, data_dir=data)
    root = dm.token_label_root()
    assert root.parent == tmp_path / "cache" / "token_labels" and root.name.startswith("test_resnet-")
    other = ImageNetDataModule(cfg.replace(teacher="resnet18"), data_dir=data).token_label_root()
    assert other != root
