"""`predict.py generate` / `evaluate` on a tiny palm model trained briefly on the demo identities: layout,
size, reproducibility, `--variation 0`, identity-keeping variations, the identity metrics, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import train
from models.palm.metrics import auc_eer, rank1_identification
from models.palm.verbs import generate

TINY_FLAGS = ["--set", "image_size=16", "--set", "unet_dim=8", "--set", "dim_mults=1,2", "--set", "vss_levels=1",
              "--set", "vss_d_state=4", "--set", "timesteps=50", "--set", "sampling_steps=6", "--set", "num_workers=0",
              "--set", "grid_every_n_steps=0", "--set", "ema_update_after_step=5", "--set", "ema_update_every=1",
              "--set", "ema_decay=0.9", "--batch-size", "16", "--lr", "3e-3", "--logger", "none", "--progress", "none"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def palm(tmp_path_factory):
    """(model, checkpoint) of a tiny palm model trained 30 steps on the demo palms."""
    out = train.run(["--model", "palm", "--max-steps", "30", "--limit-val-batches", "1", "--run-name", "gen",
                     *TINY_FLAGS])
    return out["model"].eval(), str(out["run_dir"] / "last.ckpt")


def read_set(folder):
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def test_generate_writes_m_by_n_images_reproducibly(palm, tmp_path):
    _, ckpt = palm
    args = ["--ckpt", ckpt, "generate", "--individuals", "2", "--per-individual", "3", "--seed", "7", "--batch-size", "2"]
    assert predict.main([*args, "--out", str(tmp_path / "a")]) == 0
    first = read_set(tmp_path / "a")
    assert sorted(first) == [f"id_{i:05d}/{k}.png" for i in range(2) for k in range(3)]
    assert all(a.shape == (16, 16, 3) and a.dtype == np.uint8 for a in first.values())
    assert json.loads((tmp_path / "a" / ".generation.json").read_text())["variation"] == 0.35
    # same seed, another batch size: the same bytes; another seed: other images
    assert predict.main([*args[:-2], "--batch-size", "5", "--out", str(tmp_path / "b")]) == 0
    again = read_set(tmp_path / "b")
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert predict.main([*args[:-4], "--seed", "8", "--out", str(tmp_path / "c")]) == 0
    assert not np.array_equal(first["id_00000/0.png"], read_set(tmp_path / "c")["id_00000/0.png"])
    # variations differ from each other, individuals from each other
    assert not np.array_equal(first["id_00000/0.png"], first["id_00000/1.png"])
    assert not np.array_equal(first["id_00000/0.png"], first["id_00001/0.png"])


def test_generate_refuses_a_used_folder_and_bad_values(palm, tmp_path, capsys):
    _, ckpt = palm
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "other.jpg").write_bytes(b"x")
    base = ["--ckpt", ckpt, "generate", "--individuals", "1", "--per-individual", "1"]
    assert predict.main([*base, "--out", str(tmp_path / "used")]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert predict.main([*base, "--out", str(tmp_path / "new"), "--variation", "1.5"]) == 2
    assert "--variation 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["renoise", "shared-noise"])
def test_variation_zero_gives_identical_images(palm, tmp_path, method):
    model, _ = palm
    generate(model, tmp_path, 2, 3, seed=1, variation=0.0, method=method, progress=False)
    images = read_set(tmp_path)
    for i in range(2):
        assert all(np.array_equal(images[f"id_{i:05d}/0.png"], images[f"id_{i:05d}/{k}.png"]) for k in (1, 2))
    assert not np.array_equal(images["id_00000/0.png"], images["id_00001/0.png"])


def test_an_individuals_variations_are_closer_to_each_other_than_to_others(palm, tmp_path):
    model, _ = palm
    generate(model, tmp_path, 4, 4, seed=3, variation=0.35, progress=False)
    # fixed feature space: 4x4 average-pooled colours (48 numbers per image)
    feats, labels = [], []
    for i in range(4):
        for k in range(4):
            x = torch.from_numpy(np.array(Image.open(tmp_path / f"id_{i:05d}" / f"{k}.png"))).permute(2, 0, 1).float()
            feats.append(torch.nn.functional.avg_pool2d(x[None] / 255, 4).flatten())
            labels.append(i)
    f, y = torch.stack(feats), torch.tensor(labels)
    d = torch.cdist(f, f)
    same = (y[:, None] == y[None]) & ~torch.eye(len(y), dtype=torch.bool)
    different = y[:, None] != y[None]
    assert d[same].mean() < 0.8 * d[different].mean(), (float(d[same].mean()), float(d[different].mean()))
    assert rank1_identification(-f, y) >= 0.0  # runs on any features


def test_auc_and_eer_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    same = rng.random(300) < 0.3
    scores = rng.normal(0, 1, 300) + 1.2 * same
    auc, eer = auc_eer(scores, same)
    pos, neg = scores[same], scores[~same]
    ref_auc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert abs(auc - ref_auc) < 1e-9
    grid = np.sort(scores)
    far = np.array([(neg >= t).mean() for t in grid])
    frr = np.array([(pos < t).mean() for t in grid])
    ref_eer = (far + frr)[np.argmin(np.abs(far - frr))] / 2
    assert abs(eer - ref_eer) < 0.02
    assert auc_eer(np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False])) == (1.0, 0.0)


def test_rank1_identification_counts_probes_matched_to_their_gallery_entry():
    emb = torch.tensor([[1.0, 0], [0, 1.0], [0.9, 0.1], [0.8, 0.3], [0.2, 0.9], [0.9, 0.2]])
    labels = torch.tensor([0, 1, 0, 0, 1, 1])  # gallery = images 0 and 1; the last probe looks like identity 0
    assert rank1_identification(emb, labels) == pytest.approx(3 / 4)


def test_evaluate_identity_with_a_face_checkpoint_and_errors(palm, tmp_path, capsys):
    model, palm_ckpt = palm
    # an untrained face embedder is enough to exercise the verb: written as a Lightning checkpoint by hand
    import lightning

    from models.face.module import FaceEmbedder

    face = FaceEmbedder(image_size=16, patch_size=8)
    face_ckpt = str(tmp_path / "face.ckpt")
    torch.save({"state_dict": face.state_dict(), "hyper_parameters": dict(face.hparams),
                "pytorch-lightning_version": lightning.__version__}, face_ckpt)
    generate(model, tmp_path / "gen", 3, 3, seed=0, progress=False)
    capsys.readouterr()
    assert predict.main(["--ckpt", palm_ckpt, "evaluate", "--recognizer", face_ckpt, str(tmp_path / "gen"),
                         "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["individuals"] == 3 and result["images"] == 9
    assert 0.0 <= result["auc"] <= 1.0 and 0.0 <= result["eer"] <= 1.0
    assert result["same_pairs"] == 9 and result["different_pairs"] == 27
    # a palm checkpoint embeds nothing: named in the error
    assert predict.main(["--ckpt", palm_ckpt, "evaluate-identity", "--recognizer", palm_ckpt,
                         str(tmp_path / "gen")]) == 2
    assert "'palm' model" in capsys.readouterr().err
    # generate is not a verb of the face task: the error names the checkpoint's task
    assert predict.main(["--ckpt", face_ckpt, "generate", "--individuals", "1", "--per-individual", "1",
                         "--out", str(tmp_path / "x")]) == 2
    assert "face" in capsys.readouterr().err
    # FID without local Inception weights: one line saying what to provide
    assert predict.main(["--ckpt", palm_ckpt, "quality", str(tmp_path / "gen"), "--real", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--inception PATH" in err and "nothing is downloaded" in err and len(err.splitlines()) == 1
