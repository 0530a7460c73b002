"""DeiT's hard-label distillation in DeMansia 2 (`--set distill=hard --set teacher=...`): the loss against DeiT's
formula, the distillation token and DeiT's averaged eval logits, the teacher's argmax as the target (MixToken: the
teacher sees the mixed image), checkpoints without the teacher, exact resume, and the up-front checks."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from crash import InterruptAt
from PIL import Image

import train
from losses.distillation import HardDistillationLoss
from losses.token_labeling import one_hot_smoothed, soft_cross_entropy
from model_config import DeMansia2Config
from models.demansia2 import DeMansia2, DeMansia2Net, net_kwargs
from zoo.checkpoint import load_model, save_safetensors
from zoo.errors import ZooError

K = 6
TINY = dict(d_model=32, depth=2, attn_layers=(1,), num_heads=2, attn_head_dim=16, rotary_dim=8, d_state=8,
            headdim=16, chunk_size=16, image_size=32, stem_channels=8, num_classes=K, num_workers=0)


def tiny_cfg(**changes) -> DeMansia2Config:
    return DeMansia2Config.from_presets("micro").replace(**{**TINY, **changes})


def teacher_file(tmp_path: Path, num_classes: int = K) -> Path:
    """A zoo classifier checkpoint (timm test_resnet through DeMansia 2's pipeline), exported as safetensors."""
    torch.manual_seed(1)
    teacher = DeMansia2(config=tiny_cfg(backbone="test_resnet", num_classes=num_classes))
    return save_safetensors(teacher, tmp_path / f"teacher{num_classes}.safetensors")


def image_folder(root: Path, per_class: int = 3, size: int = 36) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(K):
            for j in range(n):
                path = root / split / f"c{c}" / f"c{c}_{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return root


def test_loss_is_deits_hard_distillation_formula():
    base = torch.tensor(1.25)
    dist = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[0.1, 0.9, 0.3], [5.0, -2.0, 4.0]])  # argmax 1, 0
    # DeiT: (1 - alpha) * base + alpha * CE(dist, teacher argmax), CE by hand: logsumexp(z) - z[target]
    z = dist.detach().numpy().astype(np.float64)
    ce = np.mean([np.log(np.exp(z[0]).sum()) - z[0, 1], np.log(np.exp(z[1]).sum()) - z[1, 0]])
    for alpha in (0.5, 0.2):
        loss, term = HardDistillationLoss(alpha)(base, dist, teacher)
        assert loss.item() == pytest.approx((1 - alpha) * 1.25 + alpha * ce, rel=1e-6)
        assert term.item() == pytest.approx(ce, rel=1e-6)
    loss.backward()
    assert dist.grad is not None and dist.grad.abs().sum() > 0


def test_distillation_token_and_deits_averaged_eval_logits():
    torch.manual_seed(0)
    plain = DeMansia2Net(**net_kwargs(tiny_cfg()))
    net = DeMansia2Net(**net_kwargs(tiny_cfg(distill="hard", teacher="x")))
    assert set(net.state_dict()) - set(plain.state_dict()) == {"dist_token", "head_dist.weight", "head_dist.bias"}
    assert set(plain.state_dict()) <= set(net.state_dict())
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    feats = net.forward_features(x)  # (B, N + 2, d): 2x2 = 4 patch tokens, class token at 2, distillation token at 3
    assert feats.shape[1] == 6
    cls, dist, patches = feats[:, 2], feats[:, 3], torch.cat([feats[:, :2], feats[:, 4:]], dim=1)
    expected = (net.head(cls) + net.head_dist(dist)) / 2 + 0.5 * net.aux_head(patches).amax(dim=1)
    torch.testing.assert_close(net(x), expected)
    c, a, d = net.forward_train_distill(x)
    torch.testing.assert_close(c, net.head(cls))
    torch.testing.assert_close(d, net.head_dist(dist))
    torch.testing.assert_close(a, net.aux_head(patches))
    assert net.split_tokens(feats)[1].shape == (2, 4, 32)
    assert plain.forward_train_distill(x)[2] is None


@pytest.mark.parametrize("mix_token", [False, True])
def test_the_distillation_target_is_the_teachers_argmax_on_what_the_student_sees(tmp_path, monkeypatch, mix_token):
    path = teacher_file(tmp_path)
    cfg = tiny_cfg(distill="hard", teacher=str(path), mix_token=mix_token, distill_weight=0.5)
    model = DeMansia2(config=cfg)
    box = (0, 1, 1, 2)  # token cells (top, left, bottom, right): the top-right one of the 2x2 grid
    monkeypatch.setattr("models.demansia2.module.mix_box", lambda grid: (box, 0.75))
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    seen = {}

    def capture(base, dist_logits, teacher_logits):
        seen.update(base=base, dist=dist_logits, teacher=teacher_logits)
        return HardDistillationLoss(0.5)(base, dist_logits, teacher_logits)

    object.__setattr__(model, "distill_loss", capture)  # a function, not a module
    del model._modules["distill_loss"]
    loss = model.training_step({"image": x, "label": labels}, 0)
    # The teacher's logits, computed independently: the checkpoint opened on its own, on the image the student saw.
    shown = x.clone()
    if mix_token:  # the box's pixels (stride 16: rows 0-16, columns 16-32) come from the reversed batch
        shown[:, :, 0:16, 16:32] = x.flip(0)[:, :, 0:16, 16:32]
    with torch.no_grad():
        expected = load_model(path).net(shown)
    torch.testing.assert_close(seen["teacher"], expected)
    # The whole loss: DeiT's class term + the unchanged token term (max over tokens against the label).
    target = one_hot_smoothed(labels, K, cfg.label_smoothing)
    if mix_token:
        target = 0.75 * target + 0.25 * target.flip(0)
    cls, aux, dist = model.net.forward_train_distill(x, box if mix_token else None)
    torch.testing.assert_close(seen["dist"], dist)
    ce = torch.nn.functional.cross_entropy(dist, expected.argmax(-1))
    token = soft_cross_entropy(aux.amax(dim=1), one_hot_smoothed(labels, K, cfg.label_smoothing))
    torch.testing.assert_close(loss, 0.5 * soft_cross_entropy(cls, target) + 0.5 * ce + token)
    assert not any("teacher" in k for k in model.state_dict())


def test_tiny_run_checkpoints_no_teacher_and_resumes_exactly(tmp_path, monkeypatch):
    """6 classes x 3 images, batch 9: 2 steps per epoch, 2 epochs. The step-3 last.ckpt of the run (what a run killed
    before step 4 leaves) is kept and resumed, reloading the teacher from the config: the same raw and EMA weights
    as the uninterrupted run, and no tensor of the teacher in either checkpoint."""
    monkeypatch.setattr("zoo.trainer.CHECKPOINT_ROOT", tmp_path / "checkpoints")
    data, teacher = image_folder(tmp_path / "data"), teacher_file(tmp_path)
    sets = [f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TINY.items()
            if k != "num_workers"]
    common = ["--data-dir", str(data), "--logger", "none", "--progress", "none", "--num-workers", "0",
              "--deterministic"]
    last, kept = tmp_path / "checkpoints" / "demansia2" / "full" / "last.ckpt", tmp_path / "step3.ckpt"
    keep = InterruptAt(3, lambda: shutil.copy(last, kept))
    full = train.run(["--model", "demansia2", "--preset", "micro", *common, "--batch-size", "9", "--epochs", "2",
                      "--ckpt-every-n-steps", "1", *sets, "--set", "distill=hard", "--set", f"teacher={teacher}",
                      "--set", "mix_token=true", "--set", "ema_decay=0.5", "--run-name", "full"],
                     extra_callbacks=[keep])
    assert "train/loss_dist" in full["trainer"].callback_metrics
    assert torch.load(kept, map_location="cpu", weights_only=True)["global_step"] == 3
    resumed = train.run(["--model", "demansia2", *common, "--resume", str(kept), "--run-name", "resumed"])
    a = torch.load(last, map_location="cpu", weights_only=True)
    b = torch.load(resumed["run_dir"] / "last.ckpt", map_location="cpu", weights_only=True)
    own = set(DeMansia2(config=tiny_cfg(distill="hard", teacher=str(teacher))).state_dict())
    teacher_keys = set(load_model(teacher).net.state_dict())
    assert a["global_step"] == b["global_step"] == 4
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights: the student's alone
        assert set(a[key]) == own and {"net.dist_token", "net.head_dist.weight"} <= own
        assert not any(k.split(".", 1)[1] in teacher_keys or "teacher" in k for k in a[key] if k.startswith("net."))
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)


def test_a_teacher_with_another_class_count_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setattr("zoo.trainer.CHECKPOINT_ROOT", tmp_path / "checkpoints")
    data, teacher = image_folder(tmp_path / "data", per_class=1), teacher_file(tmp_path, num_classes=7)
    with pytest.raises(ZooError, match=r"teacher=.*teacher7\.safetensors\) has 7 classes but the dataset has 6 class "
                                       r"folders .*distill=hard \(num_classes=6\) needs"):
        train.run(["--model", "demansia2", "--preset", "micro", "--data-dir", str(data), "--logger", "none",
                   "--progress", "none", "--num-workers", "0", "--max-steps", "1", "--set", "image_size=32",
                   "--set", "distill=hard", "--set", f"teacher={teacher}"])


def test_config_checks_and_no_token_labels_from_a_distillation_teacher(tmp_path):
    with pytest.raises(ZooError, match=r"distill=hard .*needs a teacher: add --set teacher="):
        tiny_cfg(distill="hard").check()
    with pytest.raises(ZooError, match=r"distill=hard .*backbone=resnet18"):
        tiny_cfg(distill="hard", teacher="x", backbone="resnet18").check()
    with pytest.raises(ZooError, match="distill_weight"):
        tiny_cfg(distill="hard", teacher="x", distill_weight=1.5).check()
    from datamodules.imagenet import ImageNetDataModule

    data = image_folder(tmp_path / "data", per_class=1)
    dm = ImageNetDataModule(tiny_cfg(distill="hard", teacher="test_resnet"), data_dir=data)
    assert dm.token_label_root() is None  # the teacher distils; token labels only into a given token_label_dir
    dm = ImageNetDataModule(tiny_cfg(distill="hard", teacher="test_resnet", token_label_dir=str(tmp_path / "l")),
                            data_dir=data)
    assert dm.token_label_root() == tmp_path / "l"
