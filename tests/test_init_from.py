"""`--set init_from=CKPT`: one zoo run's network starts another's (face from face, face from DeMansia 2), tensors
equal after the initialisation; a checkpoint that does not fit says what it holds and what matched."""
from __future__ import annotations

import lightning as L
import pytest
import torch

import train
from datamodules.lfw import LFWDataModule
from model_config import DeMansia2Config, FaceConfig
from models.face import FaceEmbedder
from zoo.errors import ZooError

SMALL = ["--set", "image_size=32", "--set", "patch_size=8", "--set", "d_model=32", "--set", "depth=1",
         "--set", "d_state=8", "--set", "headdim=8", "--set", "embedding_dim=32", "--set", "augment=none",
         "--set", "warmup_epochs=0", "--set", "split=0.6,0.4,0.0", "--num-workers", "0", "--batch-size", "12",
         "--logger", "none", "--progress", "none", "--limit-val-batches", "1"]


class EncoderAtStart(L.Callback):
    """The encoder's tensors when training starts (after `setup`, before the first step)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.net.encoder.state_dict().items()}


def save(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def test_a_face_run_starts_from_another_face_runs_checkpoint(tmp_path, monkeypatch, capsys):
    import zoo.trainer

    monkeypatch.setattr(zoo.trainer, "CHECKPOINT_ROOT", tmp_path / "checkpoints")
    data = tmp_path / "faces"
    data.mkdir()
    LFWDataModule(FaceConfig(), data_dir=data).make_demo(data, n_people=8, per_person=3, size=32)
    first = train.run(["--model", "face", "--data-dir", str(data), "--max-steps", "2", "--run-name", "a", *SMALL])
    ckpt = first["run_dir"] / "last.ckpt"
    trained = {k.removeprefix("net.encoder."): v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()
               if k.startswith("net.encoder.")}
    fresh = FaceEmbedder(FaceConfig.from_presets("micro").replace(
        image_size=32, d_model=32, depth=1, d_state=8, headdim=8, embedding_dim=32)).net.encoder.state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)  # the second run must not start like that

    start = EncoderAtStart()
    train.run(["--model", "face", "--data-dir", str(data), "--max-steps", "1", "--run-name", "b",
               "--set", f"init_from={ckpt}", *SMALL], extra_callbacks=[start])
    assert start.state.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(start.state[k], v), k
    out = capsys.readouterr().out
    assert f"[face] initialised {len(trained)} of {len(trained)} backbone tensors from the 'face' checkpoint" in out


def test_a_demansia2_checkpoint_starts_the_face_encoder(tmp_path):
    from models.demansia2.module import DeMansia2

    source = DeMansia2(DeMansia2Config.from_presets("micro"))
    path = save(source, tmp_path / "demansia2.ckpt")
    face = FaceEmbedder(FaceConfig.from_presets("micro").replace(backbone="demansia2_micro", init_from=str(path)))
    face.setup("fit")
    encoder = face.net.encoder.state_dict()
    copied = [k for k in encoder if "net." + k in source.state_dict()]
    assert len(copied) == len(encoder) > 50  # every backbone tensor; the classifier heads are not the encoder's
    for k in copied:
        assert torch.equal(encoder[k], source.state_dict()["net." + k]), k


def test_a_demansia2_checkpoint_written_before_net_still_starts_a_backbone(tmp_path):
    """Its network was `model.` then (zoo.config_renames.STATE_RENAMES): every tensor is still found."""
    import timm

    import models  # noqa: F401 - the zoo's timm names
    from models.backbones import init_from_checkpoint
    from models.demansia2.module import DeMansia2

    source = DeMansia2(DeMansia2Config.from_presets("micro"))
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {k.replace("net.", "model.", 1): v for k, v in source.state_dict().items()},
                "hyper_parameters": dict(source.hparams)}, path)
    net = timm.create_model("demansia2_micro", num_classes=0)
    report = init_from_checkpoint(net, path)
    assert "(net.*)" in report
    for k, v in net.state_dict().items():
        assert torch.equal(v, source.state_dict()["net." + k]), k


def test_a_deeper_encoder_is_partly_initialised_and_the_report_names_the_rest(tmp_path):
    from models.backbones import init_from_checkpoint

    micro = FaceConfig.from_presets("micro")
    path = save(FaceEmbedder(micro), tmp_path / "face.ckpt")
    deeper = FaceEmbedder(micro.replace(depth=3)).net.encoder
    report = init_from_checkpoint(deeper, path)
    n = len(deeper.state_dict())
    per_block = sum(1 for k in deeper.state_dict() if k.startswith("blocks.2."))
    assert f"initialised {n - per_block} of {n} backbone tensors from the 'face' checkpoint" in report
    assert report.endswith(f"left as initialised: blocks.2 ({per_block})")


def test_a_checkpoint_that_fits_nothing_says_what_it_holds(tmp_path):
    from models.backbones import init_from_checkpoint

    # The patch stem: a conv stem's d_model-independent convolutions would fit a network of another width.
    micro = FaceConfig.from_presets("micro").replace(stem="patch", patch_size=8)
    path = save(FaceEmbedder(micro), tmp_path / "face.ckpt")
    wider = FaceEmbedder(micro.replace(d_model=32, headdim=8)).net.encoder
    with pytest.raises(ZooError, match=r"only \d+ of \d+ tensors of that 'face' checkpoint fits .*names match but "
                                       r"their shapes differ \(e\.g\. pos_embed \(1, 64, 64\) vs \(1, 64, 32\)\)"):
        init_from_checkpoint(wider, path)
    import timm

    with pytest.raises(ZooError, match=r"no tensor .*it holds net \(\d+\), .*; this backbone has conv1 \(\d+\)"):
        init_from_checkpoint(timm.create_model("test_resnet", num_classes=0), path)
    with pytest.raises(ZooError, match="Checkpoint not found"):
        FaceEmbedder(micro.replace(init_from=str(tmp_path / "nope.ckpt"))).setup("fit")
