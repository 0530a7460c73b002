"""A trained age/gender checkpoint: opens with identical predictions, and predict.py's `predict` and `export` verbs."""
from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch

import predict
from datamodules.utkface import UTKFaceDataModule
from model_config import AgeGenderConfig
from models.agegender.module import AgeGender
from zoo.checkpoint import load_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two optimizer steps on a 40-face demo set; returns (model, checkpoint path, datamodule)."""
    root = tmp_path_factory.mktemp("agegender")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_DEMO_DIR", str(root / "demo"))
        mp.setattr(UTKFaceDataModule, "DEMO_SIZE", 40)
        cfg = AgeGenderConfig.from_presets("micro").replace(num_workers=0, batch_size=8)
        dm = UTKFaceDataModule(cfg)
        dm.prepare_data()
        dm.setup("fit")
    L.seed_everything(0)
    model = AgeGender(cfg)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=dm)
    path = root / "agegender.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), path, dm


def test_checkpoint_round_trip_identical_predictions(trained):
    model, path, dm = trained
    batch = next(iter(dm.val_dataloader()))["image"]
    loaded = AgeGender.load_from_checkpoint(path, map_location="cpu").eval()
    assert loaded.cfg == model.cfg
    for a, b in zip(model.predict_batch(batch).values(), loaded.predict_batch(batch).values()):
        assert torch.equal(a, b)
    assert type(load_model(path)) is AgeGender  # predict.py's way: the task is read from the checkpoint


def test_predict_verb(trained, capsys):
    _, path, dm = trained
    images = [str(p) for p in dm.datasets["val"].paths[:2]]
    assert predict.main(["--ckpt", str(path), "predict", *images, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == images
    for r in results:
        assert 0 <= r["age"] <= 116 and r["gender"] in ("male", "female") and 0.5 <= r["probability"] <= 1
    assert predict.main(["--ckpt", str(path), "predict", images[0]]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(images[0]) and "age" in line and ("male" in line)
    assert predict.main(["--ckpt", str(path), "predict", "/no/such.jpg"]) == 2  # a ZooError, not a traceback


def test_export_verb(trained, tmp_path, capsys):
    _, path, dm = trained
    out = tmp_path / "agegender.onnx"
    images = [str(p) for p in dm.datasets["val"].paths[:3]]
    assert predict.main(["--ckpt", str(path), "export", "--out", str(out), "--images", *images, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["opset"] >= 13 and report["check_batch"] == 3
    assert report["fp32_max_abs_diff"]["age"] < 1e-2 and report["fp32_max_abs_diff"]["p_female"] < 1e-4
    assert report["int8_bytes"] < report["onnx_bytes"]
    from zoo.export import run_onnx

    age, p_female = run_onnx(out, {"image": np.zeros((5, 3, 64, 64), np.float32)})  # any batch size
    assert age.shape == p_female.shape == (5,)
    import onnxruntime as ort

    meta = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert meta["backbone"] == "resnet10t" and meta["mean"] == "0.4850,0.4560,0.4060" and "years" in meta["outputs"]
