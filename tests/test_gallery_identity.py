"""A gallery records the model that enrolled it (a fingerprint of the task, config and weights): `identify` and
`enroll` with another model refuse it in one line naming both fingerprints, `enroll --re-enroll` re-embeds its stored
images with the new model, and a gallery from before fingerprints gets a notice (identify) or a refusal (enroll)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import predict
from model_config import HandConfig
from models.hand.module import HandBiometrics
from zoo.checkpoint import save_safetensors
from zoo.fingerprint import model_fingerprint, short


def _model(seed: int) -> HandBiometrics:
    torch.manual_seed(seed)
    return HandBiometrics(HandConfig.from_presets("micro").replace(image_size=32)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    images = {}
    for person in ("alice", "bob"):
        images[person] = []
        for k in range(2):
            path = root / f"{person}{k}.png"
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(path)
            images[person].append(path)
    a, b = save_safetensors(_model(0), root / "a.safetensors"), save_safetensors(_model(1), root / "b.safetensors")
    return {"a": str(a), "b": str(b), "images": images, "root": root}


def _enroll(ckpt, gallery, person, images, *extra) -> int:
    return predict.main(["--ckpt", ckpt, "enroll", "--gallery", str(gallery), "--person", person,
                         *map(str, images), *extra])


def _meta(gallery) -> dict:
    with safe_open(str(gallery), framework="pt") as f:
        return dict(f.metadata())


def test_fingerprint_follows_weights_config_and_task(files):
    from zoo.checkpoint import load_model

    a, b = _model(0), _model(0)
    assert model_fingerprint(a) == model_fingerprint(b) and len(model_fingerprint(a)) == 64
    assert model_fingerprint(load_model(files["a"])) == model_fingerprint(a)  # the exported file: the same model
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    c = _model(0)
    c.cfg = c.cfg.replace(image_size=64)  # same weights, other preprocessing: other embeddings
    assert model_fingerprint(a) != model_fingerprint(c)
    assert short(model_fingerprint(a)) == model_fingerprint(a)[:12]


def test_another_model_is_refused_by_identify_and_enroll(files, tmp_path, capsys):
    gallery = tmp_path / "g.safetensors"
    assert _enroll(files["a"], gallery, "alice", files["images"]["alice"]) == 0
    capsys.readouterr()
    fa, fb = short(_meta(gallery)["model"]), short(model_fingerprint(_model(1)))
    before = gallery.read_bytes()
    assert predict.main(["--ckpt", files["b"], "identify", "--gallery", str(gallery), str(files["images"]["alice"][0])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fa in err and fb in err and "--re-enroll" in err and str(gallery) in err
    assert _enroll(files["b"], gallery, "bob", files["images"]["bob"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fa in err and fb in err
    assert gallery.read_bytes() == before  # nothing appended
    assert predict.main(["--ckpt", files["a"], "identify", "--gallery", str(gallery), "--json",
                         str(files["images"]["alice"][0])]) == 0
    assert json.loads(capsys.readouterr().out)[0]["gallery"]["nearest"] == "alice"


def test_re_enroll_re_embeds_the_stored_images_with_the_new_model(files, tmp_path, capsys):
    gallery = tmp_path / "g.safetensors"
    assert _enroll(files["a"], gallery, "alice", files["images"]["alice"]) == 0
    assert _enroll(files["a"], gallery, "bob", files["images"]["bob"][:1]) == 0
    assert _enroll(files["b"], gallery, "bob", files["images"]["bob"][1:], "--re-enroll") == 0
    capsys.readouterr()
    meta = _meta(gallery)
    assert meta["model"] == model_fingerprint(_model(1))
    assert json.loads(meta["persons"]) == ["alice", "alice", "bob", "bob"]
    with safe_open(str(gallery), framework="pt") as f:
        emb = f.get_tensor("embeddings")
    from models.hand.verbs import run_images

    every = [*files["images"]["alice"], *files["images"]["bob"]]
    torch.testing.assert_close(emb, run_images(_model(1), every)["embedding"])
    assert predict.main(["--ckpt", files["b"], "identify", "--gallery", str(gallery), str(every[0])]) == 0


def test_a_gallery_from_before_fingerprints(files, tmp_path, capsys):
    gallery = tmp_path / "old.safetensors"
    save_file({"embeddings": torch.randn(2, HandConfig.from_presets("micro").embedding_dim)}, str(gallery),
              metadata={"persons": json.dumps(["alice", "alice"]), "task": "hand", "image_size": "32"})
    assert predict.main(["--ckpt", files["a"], "identify", "--gallery", str(gallery),
                         str(files["images"]["alice"][0])]) == 0
    captured = capsys.readouterr()
    assert "does not record the model" in captured.err and "gallery:" in captured.out
    assert _enroll(files["a"], gallery, "bob", files["images"]["bob"]) == 2
    err = capsys.readouterr().err
    assert "does not record the model" in err and "new gallery" in err and err.count("\n") == 1
