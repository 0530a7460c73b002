"""Models of the zoo: shared blocks in `models.blocks`, one package per task (`models/<task>/`).

Importing `models` imports every task package (`models/<task>/__init__.py`, which imports the task's LightningModule
and so Lightning) and its `model.py`; a `model.py` that defines image backbones registers them with timm, so
`timm.create_model("demansia2_tiny")` (or `face_mamba_micro`, `vmamba_tiny_v0`, ...) works after `import models`.
`TIMM_NAMES` holds the names so registered.
"""
import importlib
import pkgutil

import timm

_before = set(timm.list_models())
for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg and _info.name != "blocks" and importlib.util.find_spec(f"{__name__}.{_info.name}.model"):
        importlib.import_module(f"{__name__}.{_info.name}.model")

TIMM_NAMES: frozenset[str] = frozenset(set(timm.list_models()) - _before)  # the zoo's own timm models
