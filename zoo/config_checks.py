"""Validation of config dataclasses (torch-free): each field's type, its declared range, and cross-field rules.

A config class declares what its numbers and strings may be in `CHECKS` (merged along the class hierarchy, so a task
lists only its own fields) and its rules between fields in a `check()` method:

    @dataclass
    class MyConfig(BaseConfig):
        depth: int = 6
        dropout: float = 0.1
        run_name: str = ""
        CHECKS: ClassVar[dict[str, Check]] = {"depth": at_least(1), "dropout": between(0, 1, hi_open=True),
                                              "run_name": Free("any label")}

        def check(self) -> None:
            super().check()
            if self.depth % 2:
                raise config_error(self, "depth", "must be even (layers come in pairs)")

bool and Literal fields need no entry: their type says it all and is checked for every field. Every other field
needs one (`Free(why)` where any value of its type is fine, e.g. a path opened later), which
tests/test_config_validation.py enforces and uses: it derives an invalid value from each declared check (`invalid()`)
and asserts `train.py` rejects it with a one-line error.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from zoo.errors import ZooError


class Check:
    """A constraint on one field's value (None values of Optional fields are never checked)."""

    def problem(self, value: Any) -> str | None:
        """None when `value` is fine, else what it must be (e.g. 'must be an integer >= 1')."""
        raise NotImplementedError

    def invalid(self, current: Any, integer: bool) -> list[Any]:
        """Values that break this check (for tests), shaped like `current`."""
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Check):
    """lo <= value <= hi (either bound optional; `lo_open` / `hi_open` make it strict). NaN is never in range."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return "a number"

    def problem(self, value: Any) -> str | None:
        ok = not (isinstance(value, float) and math.isnan(value))
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        return None if ok else f"must be {self.describe()}"

    def invalid(self, current: Any, integer: bool) -> list[Any]:
        out = []
        if self.lo is not None:
            out.append(self.lo if self.lo_open else (self.lo - 1 if integer else self.lo - 0.5))
        if self.hi is not None:
            out.append(self.hi if self.hi_open else (self.hi + 1 if integer else self.hi + 0.5))
        return [int(v) if integer else float(v) for v in out]


@dataclass(frozen=True)
class Each(Check):
    """Every element of a tuple satisfies `inner`."""

    inner: Check

    def problem(self, value: Any) -> str | None:
        for i, v in enumerate(value):
            why = self.inner.problem(v)
            if why:
                return f"element {i} ({v!r}) {why}"
        return None

    def invalid(self, current: Any, integer: bool) -> list[Any]:
        current = tuple(current) or (0,)
        return [(bad, *current[1:]) for bad in self.inner.invalid(current[0], integer)]


@dataclass(frozen=True)
class Matches(Check):
    """A string matching `pattern` (full match); `describe` says what that means to a user, `example` breaks it."""

    pattern: str
    describe: str
    example: str = "?bogus?"

    def problem(self, value: Any) -> str | None:
        return None if re.fullmatch(self.pattern, value) else f"must be {self.describe}"

    def invalid(self, current: Any, integer: bool) -> list[Any]:
        return [self.example]


@dataclass(frozen=True)
class Free(Check):
    """Any value of the field's type is valid here (`why`: e.g. a path that is checked when it is opened)."""

    why: str

    def problem(self, value: Any) -> str | None:
        return None

    def invalid(self, current: Any, integer: bool) -> list[Any]:
        return []


def at_least(lo: float) -> Range:
    return Range(lo=lo)


def above(lo: float) -> Range:
    return Range(lo=lo, lo_open=True)


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Range:
    return Range(lo, hi, lo_open, hi_open)


NON_EMPTY = Matches(r"(?s).+", "a non-empty string", "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# ----- types -----
def type_problem(value: Any, tp: Any) -> str | None:
    """None when `value` has type `tp` (int for float is fine, bool for int is not), else what it must be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [type_problem(value, a) for a in args if a is not type(None)]
        if any(p is None for p in problems):
            return None
        return problems[0] if len(problems) == 1 else f"must be {type_name(tp)}"
    if value is None:
        return f"must be {type_name(tp)}, not None"
    if origin is Literal:
        return None if value in args else f"must be one of {', '.join(map(str, args))}"
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return f"must be {type_name(tp)}"
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"must have {len(args)} values, not {len(value)}"
            elems = list(zip(value, args))
        else:
            elems = [(v, args[0] if args else Any) for v in value]
        for v, a in elems:
            why = type_problem(v, a)
            if why:
                return f"element {v!r} {why}"
        return None
    if tp is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if tp is str:
        return None if isinstance(value, str) else "must be a string"
    return None


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (tuple, list):
        return f"{len(args)} comma-separated values" if args and args[-1] is not Ellipsis else "comma-separated values"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "none"}.get(tp, getattr(tp, "__name__", str(tp)))


# ----- the checks of a config class -----
@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def declared_checks(cls: type) -> dict[str, Check]:
    """`CHECKS` of `cls` and its bases, the subclass's entry winning."""
    merged: dict[str, Check] = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get("CHECKS", {}) or {})
    return merged


def needs_declaration(tp: Any) -> bool:
    """Fields whose type alone does not bound them (numbers, strings, tuples) need a `CHECKS` entry."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(needs_declaration(a) for a in args if a is not type(None))
    return not (tp is bool or origin is Literal)


def config_error(cfg: Any, field: str, must: str, value: Any = dataclasses.MISSING) -> ZooError:
    """The one-line error for a bad field: names the field, the value and what it must be."""
    value = getattr(cfg, field) if value is dataclasses.MISSING else value
    shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
    return ZooError(f"{field}={shown} is not valid ({type(cfg).__name__}): {field} {must}. Change it with "
                    f"--set {field}=VALUE (or the matching flag).")


# Upper bounds on the integer fields that size memory (widths, depths, class counts, image sides), whatever the config
# class: far above every preset and published model, low enough that no config (from a command line or a file from
# elsewhere) can make the zoo build a network or a batch that exhausts memory before anything else is checked.
SIZE_LIMITS: dict[str, int] = {
    "embedding_dim": 16384, "d_model": 16384, "unet_dim": 4096, "stem_channels": 4096, "headdim": 4096,
    "attn_head_dim": 4096, "rotary_dim": 4096, "num_heads": 1024, "d_state": 4096, "vss_d_state": 4096, "expand": 64,
    "vss_expand": 64, "d_conv": 64, "depth": 256, "image_size": 4096, "patch_size": 1024, "num_classes": 1_000_000,
    "num_identities": 1_000_000, "num_age_groups": 1000, "timesteps": 100_000,
}


def size_problem(name: str, value: Any) -> str | None:
    limit = SIZE_LIMITS.get(name)
    if limit is None or not isinstance(value, int) or isinstance(value, bool) or value <= limit:
        return None
    return f"must be <= {limit} (a size the zoo bounds, so that no config can ask for unbounded memory)"


def check_config(cfg: Any) -> None:
    """Type, declared range and size limit (`SIZE_LIMITS`) of every field, then the class's cross-field `check()`;
    raises a ZooError."""
    cls = type(cfg)
    hints, checks = field_types(cls), declared_checks(cls)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        why = type_problem(value, hints[f.name])
        if why is None and value is not None and f.name in checks:
            why = checks[f.name].problem(value)
        if why is None:
            why = size_problem(f.name, value)
        if why:
            raise config_error(cfg, f.name, why, value)
    check = getattr(cfg, "check", None)
    if callable(check):
        check()
