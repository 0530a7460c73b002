"""Token labeling: dense targets follow the image's crop and flip; label-file errors name the image; the loss."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.imagenet import ImageNetDataModule, TokenLabelDataset
from losses.token_labeling import TokenLabelingLoss, dense_label_map, soft_cross_entropy, token_label_targets
from model_config import DeMansia2Config
from zoo.errors import ZooError

K = 16


def label_map_4x4() -> torch.Tensor:
    """(2, 5, 4, 4): at cell (y, x) the top class is 4y + x with score 5; four weaker classes follow."""
    scores = torch.tensor([5.0, 1.0, 0.5, 0.25, 0.125])[:, None, None].expand(5, 4, 4)
    top = torch.arange(16).reshape(4, 4)
    indices = torch.stack([(top + j) % K for j in range(5)])
    return torch.stack([scores, indices.float()]).half()


def test_dense_map_scatters_the_top5():
    dense = dense_label_map(label_map_4x4()[None], K)[0]  # (K, 4, 4)
    assert dense[6, 1, 2] == 5.0 and dense[7, 1, 2] == 1.0 and dense[0, 1, 2] == 0.0
    assert torch.allclose(dense.sum(0), torch.full((4, 4), 6.875))


def test_targets_follow_crop_and_flip_hand_computed():
    maps = label_map_4x4()[None].repeat(2, 1, 1, 1, 1)
    dense = dense_label_map(maps, K)[0]
    # The crop is the right half of the image: x from 2 to 4 cells, y from 0 to 4 (x1, y1, x2, y2); a 4x2 token grid.
    boxes = torch.tensor([[2.0, 0.0, 4.0, 4.0]] * 2)
    flips = torch.tensor([False, True])
    cls, tokens = token_label_targets(maps, boxes, flips, K, grid=(4, 2), smoothing=0.0)
    tokens = tokens.reshape(2, 4, 2, K)
    for r in range(4):
        for c in range(2):
            torch.testing.assert_close(tokens[0, r, c], dense[:, r, 2 + c].softmax(0))  # cell (r, 2 + c)
            torch.testing.assert_close(tokens[1, r, c], dense[:, r, 3 - c].softmax(0))  # mirrored
    torch.testing.assert_close(cls[0], dense[:, :, 2:].mean((1, 2)).softmax(0))  # mean over the 8 cells
    torch.testing.assert_close(cls[1], cls[0])  # a flip does not change the class-token target
    # A box read in the other axis order (LV-ViT's quirk) would give the bottom half instead: make sure we do not.
    assert not torch.allclose(tokens[0, 0, 0], dense[:, 2, 0].softmax(0))


def test_smoothing_and_loss():
    cls, tokens = token_label_targets(label_map_4x4()[None], torch.tensor([[0.0, 0.0, 4.0, 4.0]]),
                                      torch.tensor([False]), K, grid=(2, 2), smoothing=0.1)
    assert torch.allclose(cls.sum(-1), torch.ones(1)) and torch.allclose(tokens.sum(-1), torch.ones(1, 4))
    assert cls.min() >= 0.1 / K - 1e-6
    loss_fn = TokenLabelingLoss(cls_weight=1.0, token_weight=2.0)
    cls_logits, tok_logits = torch.randn(1, K), torch.randn(1, 4, K)
    loss, parts = loss_fn(cls_logits, tok_logits, cls, tokens)
    torch.testing.assert_close(loss, soft_cross_entropy(cls_logits, cls) + 2 * soft_cross_entropy(tok_logits, tokens))
    assert set(parts) == {"cls", "token"}


# ----- the dataset side -------------------------------------------------------------------------------------------
def make_set(root: Path, labels: Path, size: int = 40) -> None:
    for c in ("a", "b"):
        for j in range(2):
            img = root / "train" / c / f"{c}{j}.JPEG"
            img.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.random.default_rng(j).random((size, size, 3)) * 255).astype(np.uint8)).save(img)
            (root / "val" / c).mkdir(parents=True, exist_ok=True)
            Image.open(img).save(root / "val" / c / img.name)
            (labels / c).mkdir(parents=True, exist_ok=True)
            torch.save(label_map_4x4(), labels / c / f"{c}{j}.pt")


def datamodule(tmp_path: Path) -> ImageNetDataModule:
    make_set(tmp_path / "data", tmp_path / "labels")
    cfg = DeMansia2Config.from_presets("micro").replace(image_size=32, batch_size=4, num_workers=0,
                                                         token_label_dir=str(tmp_path / "labels"))
    dm = ImageNetDataModule(cfg, data_dir=tmp_path / "data")
    dm.setup("fit")
    return dm


def test_dataset_records_the_crop_box_in_label_cells(tmp_path, monkeypatch):
    dm = datamodule(tmp_path)
    ds = dm.train_dataset()
    assert isinstance(ds, TokenLabelDataset)
    # Force the crop to the right half of the 40x40 image (top, left, h, w) and a flip.
    monkeypatch.setattr("torchvision.transforms.RandomResizedCrop.get_params", lambda img, s, r: (0, 20, 40, 20))
    monkeypatch.setattr("datamodules.recorded_crop.random.random", lambda: 0.0)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32)
    torch.testing.assert_close(item["box"], torch.tensor([2.0, 0.0, 4.0, 4.0]))
    assert item["flip"] is True and item["label_map"].shape == (2, 5, 4, 4)
    batch = next(iter(dm.train_dataloader()))
    assert batch["label_map"].shape == (4, 2, 5, 4, 4) and batch["box"].shape == (4, 4)


def test_missing_and_malformed_label_files_name_the_image(tmp_path):
    dm = datamodule(tmp_path)
    ds = dm.train_dataset()
    (tmp_path / "labels" / "a" / "a0.pt").unlink()
    with pytest.raises(ZooError, match=r"missing for image .*a0\.JPEG.*labels/a/a0\.pt"):
        ds[0]
    torch.save(torch.zeros(5, 4, 4), tmp_path / "labels" / "a" / "a0.pt")
    with pytest.raises(ZooError, match=r"labels/a/a0\.pt \(for image .*a0\.JPEG\) is malformed.*\(5, 4, 4\)"):
        ds[0]
    (tmp_path / "labels" / "a" / "a0.pt").write_bytes(b"not a tensor")
    with pytest.raises(ZooError, match=r"a0\.pt \(for image .*a0\.JPEG\) cannot be read"):
        ds[0]
    with pytest.raises(ZooError, match="token_label_dir"):
        cfg = dm.cfg.replace(token_label_dir=str(tmp_path / "nowhere"))
        ImageNetDataModule(cfg, data_dir=tmp_path / "data").setup("fit")


def test_training_step_with_token_labels(tmp_path):
    from models.demansia2 import DeMansia2

    dm = datamodule(tmp_path)
    model = DeMansia2(config=dm.cfg.replace(num_classes=K, d_model=32, depth=2, attn_layers=(1,), attn_head_dim=16,
                                            rotary_dim=8, d_state=8, headdim=16, stem_channels=8))
    batch = next(iter(dm.train_dataloader()))
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.net.aux_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("source", ["teacher", "label"])
def test_class_token_target_is_the_teachers_or_the_label(tmp_path, source):
    """token_label_cls=teacher: the class token learns the pooled teacher map (LV-ViT); =label: the image's label,
    the teacher then supervising the tokens alone. The token targets are the teacher's either way."""
    from losses.token_labeling import one_hot_smoothed
    from models.demansia2 import DeMansia2

    dm = datamodule(tmp_path)
    cfg = dm.cfg.replace(num_classes=K, d_model=32, depth=2, attn_layers=(1,), attn_head_dim=16, rotary_dim=8,
                         d_state=8, headdim=16, stem_channels=8, mix_token=False, token_label_cls=source)
    model = DeMansia2(config=cfg)
    batch = next(iter(dm.train_dataloader()))
    seen = {}

    def capture(cls_logits, token_logits, cls_target, token_target, max_target):
        seen.update(cls=cls_target, token=token_target)
        return cls_logits.sum() * 0, {"cls": cls_logits.sum() * 0, "token": cls_logits.sum() * 0}

    object.__setattr__(model, "criterion", capture)  # not a module: bypass nn.Module's registration
    del model._modules["criterion"]
    model.training_step(batch, 0)
    teacher_cls, teacher_tokens = token_label_targets(batch["label_map"], batch["box"], batch["flip"], K,
                                                      model.net.token_grid(batch["image"]), cfg.label_smoothing)
    expected = teacher_cls if source == "teacher" else one_hot_smoothed(batch["label"], K, cfg.label_smoothing)
    torch.testing.assert_close(seen["cls"], expected)
    torch.testing.assert_close(seen["token"], teacher_tokens)
