"""`BaseConfig`: the dataclass every task's config extends (fields every task has, validation, presets, `--set`
parsing, reading a checkpoint's config), and `parse_value`, which turns a command-line string into a field's type.

Torch-free, like the configs built on it (`train.py --list` / `--help` stay fast). The task configs themselves and
their presets live in the application (`model_config.py`); names that changed are mapped by `zoo.config_renames`.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from zoo.config_checks import Check, Each, Matches, above, at_least, between, check_config, config_error
from zoo.config_renames import new_value, notice, renamed_fields, upgrade
from zoo.errors import ZooError, did_you_mean, unknown


@dataclass
class BaseConfig:
    """Training knobs every task has. Units: lr per optimizer step, epochs over the training set.

    Every config validates itself when built (`__post_init__`, so presets, `--set`, flags and checkpoints alike): each
    field's type, the range declared for it in `CHECKS`, then the rules between fields in `check()`; a bad value is a
    one-line `ZooError` naming the field, the value and the valid range. A task config lists its own fields in its
    `CHECKS` (merged with its bases'; `at_least(1)`, `above(0)`, `between(0, 1, hi_open=True)`, `Each(...)` for
    tuples, `Matches(...)` for strings, `Free("why")` where any value of the type is fine; bool and Literal fields need
    no entry) and overrides `check()` (calling `super().check()`) to raise `config_error(self, field, "must ...")`.
    tests/test_config_validation.py fails for a number, string or tuple field without a `CHECKS` entry, and feeds
    every declared range an invalid value. See zoo/config_checks.py.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: Literal["adamw", "adam", "lion", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6  # lr at the start of the warm-up
    min_lr: float = 1e-6  # lr at the end of the cosine decay
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    decay_epochs: float = 30.0  # step scheduler: decay the lr by decay_rate every decay_epochs
    decay_rate: float = 0.1
    sched_interval: Literal["step", "epoch"] = "step"
    no_decay_on_norm_bias: bool = True  # exclude norms, biases, SSM params and embeddings from weight decay
    grad_clip: float = 0.0  # max gradient norm, 0 = off
    accumulate: int = 1  # gradient accumulation: effective batch = batch_size * accumulate * devices
    seed: int = 42
    num_workers: int = 2
    image_size: int = 224
    monitor: str = "val/loss"  # metric for best-k checkpoints
    monitor_mode: Literal["min", "max"] = "min"
    save_top_k: int = 1
    ckpt_every_n_steps: int = 0  # also write last.ckpt every N optimizer steps (0 = at epoch ends only)
    strict_data: bool = False  # unreadable image files are an error instead of being reported and skipped

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    DEFAULT_PRESET: ClassVar[str | None] = None
    CHECKS: ClassVar[dict[str, Check]] = {
        "epochs": at_least(1), "batch_size": at_least(1), "lr": above(0), "weight_decay": at_least(0),
        "betas": Each(between(0, 1, hi_open=True)), "warmup_epochs": at_least(0), "warmup_lr": at_least(0),
        "min_lr": at_least(0), "decay_epochs": above(0), "decay_rate": between(0, 1, lo_open=True),
        "grad_clip": at_least(0), "accumulate": at_least(1), "seed": between(0, 2**32 - 1),
        "num_workers": at_least(0), "image_size": at_least(1),
        "monitor": Matches(r"(train|val|test)/\S+", "a logged metric such as val/loss", "loss"),
        "save_top_k": at_least(-1), "ckpt_every_n_steps": at_least(0),
    }

    def __post_init__(self) -> None:
        check_config(self)

    def check(self) -> None:
        """Rules between fields (ranges of single fields go in CHECKS); raise `config_error(self, field, why)`."""

    # ----- construction -----
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None = None, strict: bool = True,
                  where: str | None = None) -> BaseConfig:
        """Build from a plain dict (e.g. a checkpoint's hyper-parameters).

        Old field names and values (`zoo.config_renames`) are read under their new ones, each with a one-line notice.
        A key that is no field is an error when `strict`; otherwise (a checkpoint written by another version) it is
        dropped with a one-line notice that names it. `where` names the source in notices (default: the class).
        """
        where = where or cls.__name__
        values = upgrade(cls, dict(values or {}), where)
        names = set(cls.field_names())
        extra = [k for k in values if k not in names]
        if extra and strict:
            raise ZooError(
                f"{cls.__name__} has no field(s) {', '.join(map(repr, extra))}.{did_you_mean(extra[0], names)} "
                f"Valid fields: {', '.join(sorted(names))}."
            )
        if extra:
            notice(f"{where}: ignored field(s) {', '.join(map(repr, extra))}, unknown to {cls.__name__} (written by "
                   f"another version of the zoo; the defaults apply).")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce_json(v, hints[k]) for k, v in values.items() if k in names}
        return cls(**kwargs)

    @classmethod
    def from_presets(cls, presets: list[str] | str | None = None) -> BaseConfig:
        """Defaults, then each preset in order (None -> DEFAULT_PRESET)."""
        if presets is None:
            presets = [cls.DEFAULT_PRESET] if cls.DEFAULT_PRESET else []
        elif isinstance(presets, str):
            presets = [p for p in presets.split(",") if p]
        values: dict[str, Any] = {}
        for p in presets:
            if p not in cls.PRESETS:
                raise unknown("preset", p, cls.PRESETS, fix=f"(presets of {cls.__name__}; compose them with commas)")
            values.update(cls.PRESETS[p])
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> BaseConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, pairs: list[str]) -> BaseConfig:
        """Apply `key=value` strings, parsed with each field's type; errors name the key and the expected type."""
        hints = typing.get_type_hints(type(self))
        changes: dict[str, Any] = {}
        for pair in pairs:
            if "=" not in pair:
                raise ZooError(f"--set expects key=value, got '{pair}'. Example: --set lr=3e-4")
            key, raw = pair.split("=", 1)
            key = key.strip().replace("-", "_")
            renamed = renamed_fields(type(self))
            if key in renamed and key not in hints:
                notice(f"--set {key}: the field is now '{renamed[key]}' (set as {renamed[key]}={raw.strip()}).")
                key = renamed[key]
            if key not in hints or key.isupper():
                raise unknown("key", key, self.field_names(), fix=f"(fields of {type(self).__name__})")
            changes[key] = new_value(type(self), key, parse_value(raw.strip(), hints[key], key), "--set")
        return self.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_value(raw: str, tp: Any, key: str = "value") -> Any:
    """Parse a command-line string into `tp` (bool, int, float, str, Literal, Optional, tuple/list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(raw, a, key)
            except ZooError as e:
                errors.append(str(e))
        raise ZooError(f"--set {key}={raw}: expected {_type_name(tp)}. " + " ".join(errors[:1]))
    if origin is Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise ZooError(f"--set {key}={raw}: must be one of {', '.join(map(str, args))}.")
    if origin in (tuple, list):
        items = json.loads(raw) if raw.startswith("[") else [s for s in raw.split(",") if s.strip()]
        elem = args[0] if args else str
        parsed = [parse_value(str(i).strip(), elem, key) for i in items]
        if origin is tuple and args and args[-1] is not Ellipsis and len(parsed) != len(args):
            raise ZooError(f"--set {key}={raw}: expected {len(args)} comma-separated values, got {len(parsed)}.")
        return tuple(parsed) if origin is tuple else parsed
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ZooError(f"--set {key}={raw}: expected a boolean (true/false).")
    if tp in (int, float):
        try:
            value = float(raw) if tp is float else int(float(raw)) if float(raw).is_integer() else None
        except ValueError:
            value = None
        if value is None:
            raise ZooError(f"--set {key}={raw}: expected {tp.__name__}, e.g. --set {key}={'3e-4' if tp is float else '8'}.")
        return value
    if tp is str:
        return raw
    if tp is Any:
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    raise ZooError(f"--set {key}: fields of type {_type_name(tp)} cannot be set from the command line.")


def _coerce_json(value: Any, tp: Any) -> Any:
    """Lists from JSON/YAML back to tuples where the field is a tuple."""
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def split_check(cfg: Any) -> None:
    """train/val/test fractions: sum to 1, some training data."""
    if abs(sum(cfg.split) - 1.0) > 1e-6 or cfg.split[0] <= 0:
        raise config_error(cfg, "split", f"must be train,val,test fractions that sum to 1 with train > 0 "
                                         f"(these sum to {sum(cfg.split):g})")
