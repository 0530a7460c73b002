"""Every wrong config or command-line value is a one-line error (exit status 2) naming the field, the value and the
valid range, raised before any data or model is built. Invalid values are derived from each field's declared check
(model_config's CHECKS, zoo/config_checks.py), so a field added tomorrow is walked too."""
from __future__ import annotations

import dataclasses
import types
import typing

import pytest

import train
from model_config import REGISTRY
from zoo.config_checks import Free, declared_checks, field_types, needs_declaration
from zoo.errors import ZooError

READY = sorted(name for name, e in REGISTRY.items() if e.status == "ready")


class _NotBuilt:
    """Stands in for a task's LightningModule and DataModule: building either fails the test."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("a model or datamodule was built before the bad value was reported")


@pytest.fixture
def nothing_loads(monkeypatch):
    from zoo.registry import ModelEntry

    monkeypatch.setattr(ModelEntry, "load", lambda self, what: _NotBuilt)


def _one_line_error(capsys, argv: list[str]) -> str:
    assert train.main(argv) == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def _cli(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def invalid_settings(name: str) -> list[tuple[str, str]]:
    """(field, command-line value) pairs that break each field's declared type or check, at the default preset."""
    cfg_cls = REGISTRY[name].config
    cfg = cfg_cls.from_presets(None)
    hints, checks = field_types(cfg_cls), declared_checks(cfg_cls)
    out = []
    for f in dataclasses.fields(cfg):
        tp = hints[f.name]
        union = typing.get_origin(tp) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
        if any(a is bool for a in args):
            out.append((f.name, "maybe"))
        elif any(typing.get_origin(a) is typing.Literal for a in args):
            out.append((f.name, "bogus"))
        if f.name in checks:
            integer = any(a is int or typing.get_args(a)[:1] == (int,) for a in args)
            out += [(f.name, _cli(v)) for v in checks[f.name].invalid(getattr(cfg, f.name), integer)]
    return out


@pytest.mark.parametrize("name", READY)
def test_every_number_string_or_tuple_field_declares_its_valid_values(name):
    cfg_cls = REGISTRY[name].config
    hints, checks = field_types(cfg_cls), declared_checks(cfg_cls)
    missing = [f.name for f in dataclasses.fields(cfg_cls) if needs_declaration(hints[f.name]) and f.name not in checks]
    assert not missing, (f"{cfg_cls.__name__}: declare the valid values of {missing} in CHECKS (or Free('why')); "
                         f"see zoo/config_checks.py")
    assert all(c.why for c in checks.values() if isinstance(c, Free))


@pytest.mark.parametrize("name", READY)
def test_every_field_with_an_invalid_value_is_one_line_exit_2_before_anything_loads(name, capsys, nothing_loads):
    settings = invalid_settings(name)
    checked = {field for field, _ in settings}
    free = {k for k, c in declared_checks(REGISTRY[name].config).items() if isinstance(c, Free)}
    assert checked | free == set(REGISTRY[name].config.field_names())  # every field is walked or declared free
    for field, value in settings:
        line = _one_line_error(capsys, ["--model", name, "--set", f"{field}={value}", "--logger", "none"])
        assert field in line, (field, value, line)
        assert value in line or f"{field}={value}" in line or repr(value) in line, (field, value, line)


@pytest.mark.parametrize("name,sets,field,words", [
    ("demansia2", ["d_model=7"], "headdim", "d_model * expand"),  # 14 channels in heads of 16
    ("demansia2", ["image_size=60"], "image_size", "multiple of 2 * patch_size"),
    ("demansia2", ["attn_layers=2,9"], "attn_layers", "below depth"),
    ("demansia2", ["rotary_dim=33"], "rotary_dim", "even"),
    ("demansia2", ["class_names=a,b"], "class_names", "num_classes=10"),
    ("agegender", ["split=0.5,0.6,0.1"], "split", "sum to 1"),
    ("agegender", ["age_weight=0", "gender_weight=0"], "age_weight", "both be 0"),
    ("face", ["d_model=60"], "headdim", "d_model * expand"),
    ("face", ["image_size=4"], "image_size", "patch_size"),
])
def test_rules_between_fields(name, sets, field, words, capsys, nothing_loads):
    argv = ["--model", name, "--logger", "none"]
    for s in sets:
        argv += ["--set", s]
    line = _one_line_error(capsys, argv)
    assert f"{field}=" in line and words in line, line


def test_a_timm_backbone_skips_the_rules_of_our_network():
    cfg = REGISTRY["demansia2"].config.from_presets(None).replace(backbone="resnet18", d_model=7)
    assert cfg.d_model == 7


@pytest.mark.parametrize("argv,words", [
    (["--batch-size", "0"], "batch_size=0"),
    (["--epochs", "-1"], "epochs=-1"),
    (["--num-workers", "-1"], "num_workers=-1"),
    (["--lr", "-1"], "lr=-1"),
    (["--precision", "bogus"], "--precision bogus"),
    (["--max-steps", "0"], "--max-steps 0"),
    (["--run-name", "/proc/zoo-test/run"], "cannot be created or written"),
])
def test_command_line_values(argv, words, capsys, nothing_loads):
    line = _one_line_error(capsys, ["--model", "demansia2", "--logger", "none", *argv])
    assert words in line, line


def test_run_folder_at_an_existing_file(tmp_path, capsys, nothing_loads):
    (tmp_path / "taken").write_text("x")
    line = _one_line_error(capsys, ["--model", "demansia2", "--logger", "none", "--run-name", str(tmp_path / "taken")])
    assert str(tmp_path / "taken") in line and "not a folder" in line
    line = _one_line_error(capsys, ["--model", "demansia2", "--logger", "none",
                                    "--run-name", str(tmp_path / "taken" / "run")])
    assert "not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # the probe leaves nothing behind


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_preset_is_valid(name):
    cfg_cls = REGISTRY[name].config
    cfg_cls()
    for preset in cfg_cls.PRESETS:
        cfg_cls.from_presets(preset)


def test_a_checkpoint_config_with_a_bad_value_is_a_zoo_error():
    values = REGISTRY["face"].config.from_presets(None).to_dict() | {"embedding_dim": 0}
    with pytest.raises(ZooError, match=r"embedding_dim=0 .* >= 1"):
        REGISTRY["face"].config.from_dict(values)
    with pytest.raises(ZooError, match=r"lr=abc .* must be a number"):
        REGISTRY["face"].config.from_dict({"lr": "abc"})
