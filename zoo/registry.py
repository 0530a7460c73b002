"""The model registry: name -> (LightningModule, LightningDataModule, config), imported lazily.

Torch-free on purpose (`train.py --list` / `--help` stay fast). The framework holds the table; the application fills
it: each task registers itself once, beside its config dataclass (in this project at the bottom of `model_config.py`,
which the entry points `train.py` and `predict.py` import). Tests and the CLI iterate `REGISTRY`, so a model
registered there is trained, checkpointed and reloaded by the suite the moment it exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from zoo.errors import ZooError, unknown

if TYPE_CHECKING:
    from zoo.config import BaseConfig


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: where its LightningModule and LightningDataModule live (imported lazily)."""

    name: str
    module: str  # "package.module:ClassName"
    datamodule: str
    config: type[BaseConfig]
    summary: str
    status: Literal["ready", "planned"] = "ready"
    planned_note: str = ""

    def load(self, what: Literal["module", "datamodule"]) -> type:
        if self.status != "ready":
            raise ZooError(f"Model '{self.name}' is not available yet: {self.planned_note} "
                           f"Ready models: {', '.join(n for n, e in REGISTRY.items() if e.status == 'ready')}.")
        import importlib

        path = getattr(self, what)
        mod_name, cls_name = path.split(":")
        return getattr(importlib.import_module(mod_name), cls_name)


REGISTRY: dict[str, ModelEntry] = {}
DEFAULT_MODEL = "demansia2"


def register(entry: ModelEntry) -> ModelEntry:
    REGISTRY[entry.name] = entry
    return entry


def get_entry(name: str) -> ModelEntry:
    """The registered model `name`; a ZooError listing the registered ones otherwise."""
    if not REGISTRY:
        raise ZooError(f"No model is registered, so '{name}' cannot be found: import the application's registrations "
                       f"first (`import model_config`; train.py and predict.py do).")
    if name not in REGISTRY:
        raise unknown("model", name, REGISTRY, fix="Run `python train.py --list` to see them with one line each.")
    return REGISTRY[name]
