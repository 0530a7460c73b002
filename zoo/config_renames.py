"""Config names that changed, in one table: old checkpoints and old command lines keep working.

A checkpoint (or `--set`) that uses an old field name is read under the new name, and an old value of a field under
its new value, each with a one-line notice on stderr naming both (`upgrade`); a checkpoint's weights saved under an
old attribute name load under the new one (`upgrade_state`, called by `zoo.module.ZooModule.on_load_checkpoint`). docs/conventions.md lists the names in
use and why. Keys are config class names (the application's dataclasses); a class inherits its bases' entries.
"""
from __future__ import annotations

import sys
from typing import Any

# config class -> {old field name: new field name}
FIELD_RENAMES: dict[str, dict[str, str]] = {
    "FaceConfig": {
        "early_stop_patience": "early_stopping_patience",
        "loss": "metric_loss",
        "num_classes": "num_identities",
    },
    "AgeGenderConfig": {"dropout": "head_dropout"},
}

# config class -> {field: {old value: new value}}; `own` = the task's own network (docs/conventions.md)
VALUE_RENAMES: dict[str, dict[str, dict[Any, Any]]] = {
    "DeMansia2Config": {"backbone": {"demansia2": "own"}},
    "FaceConfig": {"backbone": {"mamba": "own"}, "monitor": {"val/precision_at_1": "val/rank1"}},
    "HandConfig": {"backbone": {"vmamba": "own"}},
}


# task -> {old state_dict key prefix: new prefix}: the network is `net` and the loss `criterion` in every task
STATE_RENAMES: dict[str, dict[str, str]] = {
    "demansia2": {"model.": "net."},
    "agegender": {"backbone.": "net."},
    "face": {"loss_fn.": "criterion."},
    "hand": {"metric_loss.": "criterion."},
    "palm": {"diffusion.": "net."},
}


def _table(cls: type, table: dict[str, dict]) -> dict:
    merged: dict = {}
    for klass in reversed(cls.__mro__):
        merged.update(table.get(klass.__name__, {}))
    return merged


def renamed_fields(cls: type) -> dict[str, str]:
    """{old field: new field} of a config class."""
    return _table(cls, FIELD_RENAMES)


def renamed_values(cls: type) -> dict[str, dict[Any, Any]]:
    """{field: {old value: new value}} of a config class."""
    return _table(cls, VALUE_RENAMES)


def notice(message: str) -> None:
    """One line on stderr (not a warning: Python would show a repeated one only once)."""
    print(f"notice: {message}", file=sys.stderr, flush=True)


def new_value(cls: type, field: str, value: Any, where: str) -> Any:
    """`value` of `field`, or its new spelling (with a notice) when it has one."""
    old_values = renamed_values(cls).get(field, {})
    try:
        renamed = value in old_values
    except TypeError:  # unhashable (a list from JSON)
        renamed = False
    if not renamed:
        return value
    notice(f"{where}: {field}={value} is now {field}={old_values[value]} (read as {old_values[value]}).")
    return old_values[value]


def upgrade_state(task: str, state: dict[str, Any]) -> dict[str, Any]:
    """Rename, in place, the keys of a `task` state dict written before `STATE_RENAMES` (old prefixes -> new ones);
    returns `state`. Keys already new are left alone."""
    for old, new in STATE_RENAMES.get(task, {}).items():
        for key in [k for k in state if k.startswith(old)]:
            state.setdefault(new + key[len(old):], state.pop(key))
    return state


def upgrade(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` (field -> value) with old field names and old values replaced by the new ones, one notice each.

    A value given under both an old and a new name keeps the new one (the old is dropped, with a notice).
    """
    fields = renamed_fields(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in fields:
            new = fields[key]
            if new in values:
                notice(f"{where}: '{key}' is the old name of '{new}', which is given too; '{key}' is ignored.")
                continue
            notice(f"{where}: field '{key}' is now '{new}' (its value is kept).")
            key = new
        out[key] = new_value(cls, key, value, where)
    return out
