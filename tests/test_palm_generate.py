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
from models.palm.metrics import rank1_identification
from models.palm.verbs import generate
from zoo.errors import ZooError
from zoo.verification import auc_eer

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
                         "--json", "--out", str(tmp_path / "eval" / "palm.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["individuals"] == 3 and result["images"] == 9
    saved = json.loads((tmp_path / "eval" / "palm.json").read_text())
    assert saved["sets"] == [result] and len(saved["plots"]) == 2
    for name in ("palm_roc.png", "palm_det.png"):  # ROC and DET curves beside the JSON
        with Image.open(tmp_path / "eval" / name) as im:
            assert im.format == "PNG" and im.size == (720, 540)
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


# ----- faults of issue 27: bounds, unwritable --out, overwrite, interrupt + resume, incomplete sets, bad files -----
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def forbid_sampling(monkeypatch):
    """Any sampling fails the test: the checks under test must come before it."""
    from models.palm.variations import IdentitySampler

    def sampled(*args, **kwargs):
        raise AssertionError("sampling started before the up-front checks")
        yield  # pragma: no cover - a generator, like the real one

    monkeypatch.setattr(IdentitySampler, "generate", sampled)


def refuse_writes_under(folder, monkeypatch):
    """`folder` read-only. chmod does it for a normal user; root writes through any mode bits, so there the test makes
    the file-creating calls refuse paths under `folder` exactly as the kernel does (PermissionError, errno 13)."""
    import builtins
    import io
    import os

    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    base = os.path.realpath(folder)

    def under(p) -> bool:  # creating p writes into its parent folder
        return os.path.dirname(os.path.realpath(os.fspath(p))).startswith(base)

    def refuse(p):
        raise PermissionError(13, "Permission denied", os.fspath(p))

    real_open, real_mkdir, real_rename, real_replace = builtins.open, os.mkdir, os.rename, os.replace

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def mkdir(p, *a, **k):
        if under(p):
            refuse(p)
        return real_mkdir(p, *a, **k)

    def moved(real):
        def move(src, dst, *a, **k):
            if under(dst):
                refuse(dst)
            return real(src, dst, *a, **k)
        return move

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rename", moved(real_rename))
    monkeypatch.setattr(os, "replace", moved(real_replace))


def test_generate_checks_counts_and_a_writable_out_before_sampling(palm, tmp_path, monkeypatch, capsys):
    _, ckpt = palm
    forbid_sampling(monkeypatch)
    base = ["--ckpt", ckpt, "generate", "--out", str(tmp_path / "new")]
    assert predict.main([*base, "--individuals", "1000000000", "--per-individual", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--individuals 1000000000" in err and "100000" in err and len(err.splitlines()) == 1
    assert predict.main([*base, "--individuals", "2", "--per-individual", "5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--per-individual 5000" in err and "1000" in err
    assert not (tmp_path / "new").exists()  # nothing written for refused counts
    # a read-only --out: one line naming it, exit 2, before anything is sampled
    ro = tmp_path / "ro"
    ro.mkdir()
    refuse_writes_under(ro, monkeypatch)
    for out in (ro, ro / "set"):
        assert predict.main(["--ckpt", ckpt, "generate", "--individuals", "2", "--per-individual", "2",
                             "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert str(out) in err and "writ" in err and len(err.splitlines()) == 1, err


def test_the_sampler_does_not_list_every_individual(palm):
    model, _ = palm
    sampler = model.identity_sampler(steps=1, variation=0.0, batch_size=1)
    i, images = next(sampler.generate(10 ** 12, 1))  # a list of 10**12 indices would need 8 TB
    assert i == 0 and images.shape == (1, 3, 16, 16)


def test_overwrite_removes_only_what_the_previous_generation_wrote(palm, tmp_path, capsys):
    _, ckpt = palm
    out = tmp_path / "set"
    run = ["--ckpt", ckpt, "generate", "--out", str(out), "--steps", "2"]
    assert predict.main([*run, "--individuals", "3", "--per-individual", "3"]) == 0
    (out / "README.txt").write_text("notes of the user")  # unrelated: must survive
    (out / "mine").mkdir()
    (out / "mine" / "0.png").write_bytes((out / "id_00000" / "0.png").read_bytes())
    assert predict.main([*run, "--individuals", "1", "--per-individual", "1", "--overwrite"]) == 0
    assert sorted(read_set(out)) == ["id_00000/0.png", "mine/0.png"]
    assert (out / "README.txt").read_text() == "notes of the user"
    meta = json.loads((out / ".generation.json").read_text())
    assert meta["individuals"] == 1 and meta["per_individual"] == 1 and meta["completed"] == 1
    # a file the user put inside a generated folder: --overwrite refuses, naming it, and deletes nothing
    (out / "id_00000" / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert predict.main([*run, "--individuals", "2", "--per-individual", "1", "--overwrite"]) == 2
    assert "keep.txt" in capsys.readouterr().err
    assert (out / "id_00000" / "0.png").is_file() and (out / "id_00000" / "keep.txt").is_file()


def test_a_rerun_with_other_settings_is_refused_and_a_complete_set_is_left_alone(palm, tmp_path, capsys):
    _, ckpt = palm
    out = tmp_path / "set"
    run = ["--ckpt", ckpt, "generate", "--out", str(out), "--steps", "2", "--individuals", "2", "--per-individual", "2"]
    assert predict.main(run) == 0
    before = read_set(out)
    capsys.readouterr()
    assert predict.main(run) == 0  # same command again: complete, nothing to do
    assert "complete" in capsys.readouterr().out
    assert predict.main([*run, "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "seed" in err and "--overwrite" in err and len(err.splitlines()) == 1
    after = read_set(out)
    assert sorted(after) == sorted(before) and all(np.array_equal(before[k], after[k]) for k in before)


def test_inception_weights_and_recognizer_files_are_checked(palm, tmp_path, capsys):
    import pickle

    _, ckpt = palm
    raw = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    raw.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))  # a raw pickle, not a torch file
    capsys.readouterr()
    assert predict.main(["--ckpt", ckpt, "quality", str(tmp_path), "--real", str(tmp_path),
                         "--inception", str(raw)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(raw) in err and "--inception" in err and len(err.splitlines()) == 1
    # a missing recogniser: predict.py's words (no train.py --resume hint)
    assert predict.main(["--ckpt", ckpt, "evaluate-identity", "--recognizer", str(tmp_path / "face.ckpt"),
                         str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--recognizer" in err and "face.ckpt" in err and "--resume" not in err


def interrupt_generate(ckpt: str, out, extra: list[str]):
    """predict.py generate in a subprocess, SIGINT (as Ctrl-C) once the first individual's folder exists."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # A shell starts background jobs with SIGINT ignored (then Python installs no KeyboardInterrupt handler): the
    # child restores the default handler before running predict.py, as a terminal's foreground process has it.
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "predict.py"), "--ckpt", ckpt, "generate",
                             "--out", str(out), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "id_00000").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "generation ended before the interrupt: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


GEN = ["--individuals", "40", "--per-individual", "2", "--steps", "2", "--batch-size", "2", "--seed", "4"]


@pytest.fixture(scope="module")
def interrupted(palm, tmp_path_factory):
    """(exit status, stdout, stderr, folder) of a generation of 40 x 2 interrupted after its first individual."""
    _, ckpt = palm
    out = tmp_path_factory.mktemp("interrupted") / "set"
    return (*interrupt_generate(ckpt, out, GEN), out)


@pytest.mark.slow  # the `interrupted` fixture is a predict.py process
def test_an_interrupted_generate_leaves_only_complete_individuals_and_says_so(interrupted):
    code, stdout, stderr, out = interrupted
    assert code == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    message = stderr.strip().splitlines()[-1]
    folders = sorted(p.name for p in out.iterdir())
    people = [f for f in folders if f.startswith("id_")]
    assert folders == [".generation.json", *people]  # no half-written folder left, hidden or not
    assert 1 <= len(people) < 40 and f"{len(people)} of 40" in message and "again" in message, message
    for name in people:  # every folder that exists is complete
        images = sorted((out / name).iterdir())
        assert [p.name for p in images] == ["0.png", "1.png"]
        assert all(np.asarray(Image.open(p)).shape == (16, 16, 3) for p in images)
    meta = json.loads((out / ".generation.json").read_text())
    assert meta["individuals"] == 40 and meta["per_individual"] == 2 and meta["completed"] == len(people)
    assert meta["status"] == "interrupted"


@pytest.mark.slow  # the `interrupted` fixture is a predict.py process
def test_readers_say_a_generated_set_is_incomplete(palm, interrupted, capsys):
    from datamodules.lfw import LFWDataModule
    from model_config import FaceConfig

    _, _, _, out = interrupted
    people = len([p for p in out.iterdir() if p.name.startswith("id_")])
    cfg = FaceConfig.from_presets("micro").replace(image_size=16, num_workers=0, min_images_per_person=1)
    try:
        LFWDataModule(cfg, data_dir=out).setup("fit")
    except Exception:  # too few identities to train is fine here: the notice comes first
        pass
    err = capsys.readouterr().err
    assert f"{people} of 40" in err and "incomplete" in err and "generate" in err, err
    from models.palm.verbs import identity_report

    class Pixels:  # a stand-in recogniser: mean colour as the embedding
        TASK = "none"
        cfg = type("C", (), {"image_size": 16})

        def embed(self, x):
            return x.mean((2, 3))

    try:
        identity_report(Pixels(), out)
    except ZooError:  # a single finished individual is too few to score: the notice comes first
        assert people == 1
    err = capsys.readouterr().err
    assert f"{people} of 40" in err and "incomplete" in err


@pytest.mark.slow  # the `interrupted` fixture is a predict.py process
def test_the_same_command_resumes_an_interrupted_set(palm, interrupted, tmp_path, capsys):
    import shutil

    _, ckpt = palm
    _, _, _, first = interrupted
    out = tmp_path / "set"
    shutil.copytree(first, out)
    kept = read_set(out)
    assert predict.main(["--ckpt", ckpt, "generate", "--out", str(out), *GEN]) == 0
    done = read_set(out)
    assert sorted(done) == [f"id_{i:05d}/{k}.png" for i in range(40) for k in range(2)]
    assert all(np.array_equal(kept[k], done[k]) for k in kept)  # the finished individuals were not redrawn
    meta = json.loads((out / ".generation.json").read_text())
    assert meta["status"] == "complete" and meta["completed"] == 40
    # the resumed individuals are those an uninterrupted run draws (the last two, drawn on their own here)
    model, _ = palm
    sampler = model.identity_sampler(steps=2, seed=4, batch_size=8)
    for i, images in sampler.generate(40, 2, skip=range(38)):
        fresh = (images.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
        assert all(np.array_equal(fresh[k], done[f"id_{i:05d}/{k}.png"]) for k in range(2))
