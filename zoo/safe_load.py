"""Read a torch file from elsewhere as data: tensors and plain values, with inert placeholders for any other class.

Released checkpoints carry more than weights: VMamba's v0 `.pth` pickles its yacs `CfgNode` config, Lightning
checkpoints may hold `AttributeDict` / `argparse.Namespace` hyper-parameters, training scripts pickle their own config
classes or a `functools.partial`. torch's weights-only load refuses such a file, and full pickle would import and
call those classes (that is how a pickle runs code). `read_as_data` takes the third way:

- `InertUnpickler.find_class` is the only door through which a pickle reaches a class or function. It hands out the
  globals of torch's own weights-only allow-list (tensor / storage rebuild functions, dtypes, `OrderedDict`, ...)
  and a few plain builtins and numpy array constructors, all resolved from objects already imported here, never by
  the name in the file. Every other name gets a fresh `Inert` subclass named after it: nothing is imported, and
  whatever the pickle then does with it (call it, `__new__` it, set its state, fill it as a dict or a list) only
  records data on the placeholder.
- torch's weights-only unpickler cannot do this: its allow-list can take stand-in classes (`add_safe_globals` with a
  name), but it fills only exact `dict` / `list` objects, so a dict subclass such as yacs' `CfgNode` still fails.

`zoo.checkpoint.safe_load` uses this only when a weights-only load refuses the file, and prints one line naming the
classes it stood in for.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import types
from pathlib import Path
from typing import Any

import torch


class Inert(dict):
    """Stand-in for a class found in a file: holds what the pickle gave it, runs nothing.

    Attributes:
        foreign: the `module.name` the file named (class attribute of each placeholder class).
        args: positional arguments of the call / `__new__` the pickle made (tuple).
        state: the state the pickle set (`BUILD`), usually the original object's `__dict__`.
        items: list items the pickle appended (for list subclasses).
    The dict part holds the items a dict subclass (e.g. yacs' `CfgNode`) had, so `ckpt["config"]["MODEL"]` reads
    like the original. Attributes found in `state` read as attributes (`ns.lr` of an `argparse.Namespace`).
    """

    foreign = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = dict.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the original __init__ is never run
        self.__dict__.update(args=args, kwargs=kwargs)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:
        self.__dict__["items"].append(item)

    def extend(self, items: Any) -> None:
        self.__dict__["items"].extend(items)

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__.get("state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict) and name in state:
            return state[name]
        raise AttributeError(f"{self.foreign} placeholder has no attribute {name!r}")

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:  # e.g. `getattr(Path, "touch")(...)`: one more record
        return type(self)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert {self.foreign}>"

    def __reduce__(self):  # a placeholder that is saved again stays a plain record
        return (dict, (dict(self),))


def _plain_globals() -> dict[str, Any]:
    """The globals a file may name, besides torch's weights-only allow-list: plain builtins and numpy arrays."""
    allowed: dict[str, Any] = {f"builtins.{t.__name__}": t for t in (
        bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset, slice, range)}
    allowed.update({"collections.OrderedDict": collections.OrderedDict, "collections.defaultdict":
                    collections.defaultdict, "collections.deque": collections.deque, "collections.Counter":
                    collections.Counter, "__builtin__.set": set})
    try:
        import importlib

        import numpy as np

        try:
            multiarray = importlib.import_module("numpy._core.multiarray")  # numpy 2 (numpy.core warns there)
        except ImportError:
            multiarray = importlib.import_module("numpy.core.multiarray")
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[f"{mod}._reconstruct"], allowed[f"{mod}.scalar"] = multiarray._reconstruct, multiarray.scalar
        allowed.update({"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype})
    except Exception:  # noqa: BLE001 - numpy absent or reorganised: its arrays become placeholders
        pass
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed.update(_get_allowed_globals())
    return allowed


class InertUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` whose globals are the allow-list or inert placeholders (see the module docstring).

    `stood_in` lists the `module.name` of every class or function replaced, in order of first use.
    """

    _allowed: dict[str, Any] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if InertUnpickler._allowed is None:
            InertUnpickler._allowed = _plain_globals()
        self.stood_in: dict[str, type] = _current_record()

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names of builtins (torch.save writes protocol 2), mapped as pickle itself maps them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if full not in self.stood_in:
            self.stood_in[full] = type(name if name.isidentifier() else "Foreign", (Inert,),
                                       {"foreign": full, "__module__": __name__, "__qualname__": f"Inert[{full}]"})
        return self.stood_in[full]


_record: dict[str, type] = {}


def _current_record() -> dict[str, type]:
    return _record


def _pickle_module() -> types.ModuleType:
    """A module object torch.load accepts as `pickle_module`, with our unpickler (also for the legacy format)."""
    mod = types.ModuleType("zoo_inert_pickle")
    mod.Unpickler = InertUnpickler
    mod.load = lambda f, **kw: InertUnpickler(f, **kw).load()
    mod.loads = lambda b, **kw: InertUnpickler(io.BytesIO(b), **kw).load()
    mod.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})
    return mod


def read_as_data(path: str | Path) -> tuple[Any, list[str]]:
    """Load a torch file on the CPU with placeholders for every class outside the allow-list.

    Returns (the object, the sorted `module.name`s stood in for). Errors of a corrupt file propagate as they are.
    """
    global _record
    _record = {}
    try:
        # weights_only=False only hands unpickling to InertUnpickler: its find_class is the one gate for globals
        # (torch's weights-only allow-list, plain builtins, numpy arrays; anything else an inert placeholder).
        obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_pickle_module())
        return obj, sorted(_record)
    finally:
        _record = {}


def stood_in_line(path: str | Path, names: list[str]) -> str:
    """The one line that says which classes of a file were replaced by placeholders."""
    shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
    return (f"[zoo] {Path(path).name}: read as data; inert placeholders stand in for {shown} "
            f"(never imported or run)")


__all__ = ["Inert", "InertUnpickler", "read_as_data", "stood_in_line"]
