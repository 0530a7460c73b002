"""A checkpoint never runs code: a crafted file whose unpickling would create a marker file is read as data by every
entry point that reads checkpoints (an inert placeholder stands in for the payload, named in one line; the marker
never appears) and refused by those that stay strictly weights-only (--resume, --validate / --test, which Lightning
reads again); genuine checkpoints of every task, the synthesised released DeMansia 2 checkpoint and .safetensors
exports still open, the exports to identical predictions."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

import predict
import train
from model_config import REGISTRY
from zoo.checkpoint import load_model, read_checkpoint, safe_load
from zoo.errors import ZooError
from zoo.export import same_tensor

READY = sorted(name for name, e in REGISTRY.items() if e.status == "ready")


class Payload:
    """Unpickling this calls Path.touch(marker): the stand-in for any code a malicious checkpoint would run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def crafted_checkpoint(path: pathlib.Path, marker: pathlib.Path, task: str = "demansia2") -> pathlib.Path:
    """A file shaped like a zoo checkpoint of `task`, with the payload among its hyper-parameters."""
    config = REGISTRY[task].config.from_presets(None).to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 0, "global_step": 1,
                "hyper_parameters": {"task": task, "config": config, "note": Payload(marker)}}, path)
    return path


@pytest.fixture
def evil(tmp_path, monkeypatch):
    import zoo.trainer

    root = tmp_path / "checkpoints"
    monkeypatch.setattr(zoo.trainer, "CHECKPOINT_ROOT", root)
    marker = tmp_path / "PWNED"
    path = crafted_checkpoint(root / "demansia2" / "planted" / "last.ckpt", marker)
    return path, marker


def _refused(capsys, status: int, path) -> None:
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Refusing to open" in err and str(path) in err and "pathlib" in err and "--trust-checkpoint" in err, err
    assert "Traceback" not in err


def _read_as_data(capsys, status: int, path) -> None:
    """Opened with a placeholder for the payload, said in one line; whatever fails next (the planted weights fit no
    network) is a one-line error, not a traceback."""
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if "inert placeholders stand in for" in ln]
    assert len(line) == 1 and path.name in line[0] and "pathlib.Path" in line[0] and "builtins.getattr" in line[0], err
    assert status in (0, 2) and "Traceback" not in err, err


def test_the_payload_is_real(evil):
    """Control: with --trust-checkpoint's full pickle the payload does run (so the checks below are not vacuous)."""
    path, marker = evil
    safe_load(path, trust=True)
    assert marker.exists()


@pytest.mark.parametrize("argv", [
    ["predict", "classify", "image.jpg"],
    ["predict", "--help"],
    ["predict", "export", "--format", "safetensors"],
    ["train", "--resume", "PATH"],
    ["train", "--resume", "last"],
    ["train", "--validate", "--ckpt", "PATH"],
    ["train", "--test", "--ckpt", "last"],
    ["convert", "PATH", "OUT"],
], ids=lambda a: " ".join(a))
def test_crafted_checkpoint_runs_no_code_at_any_entry_point(argv, evil, capsys, tmp_path):
    path, marker = evil
    tool, *rest = argv
    rest = [str(path) if a == "PATH" else str(tmp_path / "out.ckpt") if a == "OUT" else a for a in rest]
    if tool == "predict":
        status = predict.main(["--ckpt", str(path), *rest])
    elif tool == "train":
        status = train.main(["--model", "demansia2", "--logger", "none", "--progress", "none", *rest])
    else:
        from models.demansia2 import convert

        status = convert.main(rest)
        assert not (tmp_path / "out.ckpt").exists()
    if tool == "train":  # strictly weights-only: Lightning reads the file again
        _refused(capsys, status, path)
    else:
        _read_as_data(capsys, status, path)
    assert not marker.exists()


def test_every_loading_function_reads_it_as_data(evil, capsys):
    path, marker = evil
    from models.backbones import init_from_checkpoint
    from zoo.safe_load import Inert

    for what in ("token label file", "checkpoint"):
        note = safe_load(path, what)["hyper_parameters"]["note"]
        assert isinstance(note, Inert) and note.foreign == "builtins.getattr", note
    assert read_checkpoint(path)["state_dict"]["w"].shape == (2,)
    with pytest.raises(ZooError, match="do not fit|lacks .* tensor"):
        load_model(path)
    with pytest.raises(ZooError, match="no tensor"):
        init_from_checkpoint(torch.nn.Linear(2, 2), path)
    with pytest.raises(ZooError, match="Refusing to open .*pathlib"):
        read_checkpoint(path, weights_for="--resume")
    with pytest.raises(ZooError, match="Refusing to open .*pathlib"):
        safe_load(path, placeholders=False)
    assert not marker.exists()
    assert capsys.readouterr().err.count("inert placeholders stand in for") == 5


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """`genuine(task)`: the last.ckpt of one short run of that task (trained on first use)."""
    import zoo.trainer

    root, paths = tmp_path_factory.mktemp("genuine"), {}

    def get(name: str) -> pathlib.Path:
        if name not in paths:
            old, zoo.trainer.CHECKPOINT_ROOT = zoo.trainer.CHECKPOINT_ROOT, root
            try:
                cfg = REGISTRY[name].config.from_presets(None)
                extra = ["--set", "pretrained=false"] if hasattr(cfg, "pretrained") else []
                if hasattr(cfg, "grid_every_n_steps"):  # palm's end-of-training DDIM grid: most of the fixture's time
                    extra += ["--set", "grid_every_n_steps=0"]
                out = train.run(["--model", name, "--max-steps", "1", "--limit-val-batches", "1", "--logger", "none",
                                 "--progress", "none", "--run-name", "g", "--batch-size", "4", "--set",
                                 "num_workers=0", "--set", "image_size=32", *extra])
            finally:
                zoo.trainer.CHECKPOINT_ROOT = old
            paths[name] = out["run_dir"] / "last.ckpt"
        return paths[name]

    return get


def _outputs(model, size: int):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
    flat, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", READY)
def test_genuine_checkpoints_need_nothing_beyond_weights_only(name, genuine, tmp_path, capsys):
    path = genuine(name)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # torch's own allow-list, nothing added
    assert raw["hyper_parameters"]["task"] == name
    model = load_model(path)
    reference = type(model).load_from_checkpoint(str(path), map_location="cpu", weights_only=True).eval()
    for k, v in reference.state_dict().items():
        assert same_tensor(model.state_dict()[k], v), k

    out = tmp_path / f"{name}.safetensors"
    assert predict.main(["--ckpt", str(path), "export", "--format", "safetensors", "--out", str(out)]) == 0
    assert out.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON; no pickle anywhere
    exported = load_model(out)
    assert type(exported) is type(model) and exported.cfg == model.cfg
    assert exported.state_dict().keys() == model.state_dict().keys()
    size = model.cfg.image_size or 64
    for a, b in zip(_outputs(model, size), _outputs(exported, size), strict=True):
        assert torch.equal(a, b)
    capsys.readouterr()


def test_resume_and_validate_of_a_genuine_checkpoint_use_weights_only_loading(genuine, monkeypatch):
    """Lightning reads the checkpoint again on --resume / --validate: with weights_only=True."""
    import lightning.fabric.utilities.cloud_io as cloud_io

    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cloud_io.torch, "load", spy)
    path = genuine("demansia2")
    out = train.run(["--model", "demansia2", "--validate", "--ckpt", str(path), "--logger", "none", "--progress",
                     "none", "--limit-val-batches", "1", "--batch-size", "4", "--set", "num_workers=0"])
    assert out["results"] and seen and all(w is True for w in seen), seen


def test_safetensors_export_is_refused_for_resume(genuine, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert predict.main(["--ckpt", str(genuine("demansia2")), "export", "--out", str(out)]) == 0
    capsys.readouterr()
    assert train.main(["--model", "demansia2", "--resume", str(out), "--logger", "none"]) == 2
    assert "holds the weights only" in capsys.readouterr().err


def test_released_demansia2_checkpoint_reads_as_data(tmp_path):
    """The synthesised released checkpoint (its hyper-parameters hold a torch.dtype, tuples and dicts, its callback
    state a list of tensors) needs nothing beyond the allow-list, and converts."""
    from test_demansia2_convert import released_checkpoint, released_state_dict

    from models.demansia2 import convert

    src = released_checkpoint(tmp_path / "DeMansia 2 Tiny EMA.ckpt", released_state_dict(depth=2, attn=(1,)),
                              depth=2, attn=(1,))
    ckpt = convert.read_released(src)
    assert ckpt["hyper_parameters"]["dtype"] is torch.float32
    assert len(ckpt["callbacks"]["EMA"]["ema_weights"]) == len(ckpt["state_dict"])
    dst = convert.convert(src, tmp_path / "zoo.ckpt")
    model = load_model(dst)
    assert model.cfg.depth == 2 and model.cfg.scan_mode == "legacy"


def test_an_unsafe_file_names_each_type_it_carries(tmp_path, capsys):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "f": os.system}, path)
    with pytest.raises(ZooError, match=r"holds (posix|nt)\.system"):
        read_checkpoint(path, weights_for="--resume")
    assert read_checkpoint(path)["f"].foreign in ("posix.system", "nt.system")  # the placeholder class, never called
    assert "stand in for posix.system" in capsys.readouterr().err or os.name == "nt"
