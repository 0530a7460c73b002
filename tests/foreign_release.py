"""Throwaway modules defining the foreign classes that released checkpoints pickle, and writers of each release's format.

`foreign_modules(tmp, marker)` writes stand-ins for yacs' `CfgNode` (module `yacs.config`), a Lightning-style
`AttributeDict`, an upstream training-config class and a payload whose unpickling calls a function, all in a temporary
folder put on sys.path while the test saves its files. Importing any of them, or running their `__init__`,
`__setstate__` or the payload's function, writes `marker`. On exit the folder leaves sys.path and the modules leave
sys.modules, and the marker written while saving is deleted: after the zoo reads a file, `marker.exists()` says
whether any code from it ran.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch

_SOURCE = '''
import pathlib
MARKER = pathlib.Path({marker!r})
MARKER.write_text("imported " + __name__)


def ran(what):
    MARKER.write_text(what)


class CfgNode(dict):
    def __init__(self, *args, **kwargs):
        ran("CfgNode.__init__")
        super().__init__(*args, **kwargs)

    def __setstate__(self, state):
        ran("CfgNode.__setstate__")
        self.__dict__.update(state)


class AttributeDict(dict):
    def __setstate__(self, state):
        ran("AttributeDict.__setstate__")


class TrainConfig:
    def __init__(self, **kw):
        ran("TrainConfig.__init__")
        self.__dict__.update(kw)

    def __setstate__(self, state):
        ran("TrainConfig.__setstate__")
        self.__dict__.update(state)


class Payload:
    def __reduce__(self):
        return (ran, ("Payload",))
'''
PACKAGES = ("yacs", "lightning_standin", "upstream_train")


@contextlib.contextmanager
def foreign_modules(tmp: Path, marker: Path) -> Iterator[types.SimpleNamespace]:
    """Yields the stand-in classes: CfgNode (yacs.config), AttributeDict, TrainConfig, Payload."""
    root = tmp / "foreign_src"
    for pkg, mod in (("yacs", "config"), ("lightning_standin", "parsing"), ("upstream_train", "config")):
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").write_text("")
        (root / pkg / f"{mod}.py").write_text(_SOURCE.format(marker=str(marker)))
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    try:
        yacs = importlib.import_module("yacs.config")
        pl = importlib.import_module("lightning_standin.parsing")
        up = importlib.import_module("upstream_train.config")
        yield types.SimpleNamespace(CfgNode=yacs.CfgNode, AttributeDict=pl.AttributeDict,
                                    TrainConfig=up.TrainConfig, Payload=up.Payload)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
            del sys.modules[name]
        importlib.invalidate_caches()
        marker.unlink(missing_ok=True)


def vmamba_v0_release(path: Path, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                      classes: types.SimpleNamespace) -> Path:
    """VMamba's v0 `.pth` (main.py's save_checkpoint): model, model_ema, optimizer, lr_scheduler, epoch, max_accuracy
    and config, a yacs CfgNode."""
    cfg = classes.CfgNode(MODEL=classes.CfgNode(TYPE="vssm", NAME="vssm_tiny", DROP_PATH_RATE=0.1),
                          TRAIN=classes.CfgNode(EPOCHS=300, BASE_LR=1e-3))
    cfg.__dict__["__immutable__"] = True
    torch.save({"model": model, "model_ema": ema,
                "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                              "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": [0]}]},
                "lr_scheduler": {"t_initial": 300, "warmup_t": 20}, "epoch": 292, "max_accuracy": 82.2,
                "config": cfg}, path)
    return path
