"""Reading checkpoints as data (never code), finding a model's latest run, and opening any zoo checkpoint by its task.

Every file the zoo reads with `torch.load` (checkpoints, token-label maps, galleries, converted upstream weights) goes
through `safe_load`: weights-only (tensors, plain containers, numbers, strings and the few types in
`SAFE_GLOBALS`); a file that holds other classes (released checkpoints pickle their configs) is read with inert
placeholders in their place (`zoo.safe_load`), never importing or calling them, and says so in one line. `--resume`
stays strictly weights-only (refusing, naming the type). Full pickle only with `--trust-checkpoint`.

A `.safetensors` file written by `predict.py --ckpt X export --format safetensors` (weights + task + config as JSON
metadata, no pickle at all) opens with `load_model` and `predict.py` like a `.ckpt`.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError

TRUST_FLAG = "--trust-checkpoint"
SAFETENSORS_SUFFIX = ".safetensors"
META_TASK, META_CONFIG, META_VERSION = "zoo.task", "zoo.config", "zoo.format"

# Types a checkpoint may hold beyond torch's weights-only defaults (tensors, storages, dtypes, devices, torch.Size,
# OrderedDict, dict/list/tuple/set, numbers, str, bytes, None). Every checkpoint this zoo writes (all tasks, EMA,
# loader and RNG state, best-k and crash checkpoints) and the released DeMansia 2 checkpoint need none of them: the
# list stays empty until a checkpoint really needs a type, and a type goes in only if building it cannot run code
# (plain data classes; never functions, `eval`-like constructors or anything with a custom __reduce__).
SAFE_GLOBALS: list[Any] = []


@contextlib.contextmanager
def safe_globals() -> Iterator[None]:
    """Let weights-only loads in this block (ours and Lightning's `trainer.fit(ckpt_path=...)`) accept SAFE_GLOBALS."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        yield


def unsafe_types(path: str | Path) -> list[str]:
    """The `module.name` of every global in a torch file that a weights-only load would refuse, read from the pickle's
    opcodes without running it ([] when none, or when the file is not a torch zip file)."""
    try:
        with safe_globals():
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - a corrupt or legacy file: the caller reports the load error instead
        return []


def refusal(path: str | Path, types: list[str], what: str = "checkpoint", flag: str = TRUST_FLAG) -> ZooError:
    """The error for a file that needs more than the weights-only allow-list."""
    types = sorted(set(types))
    named = ", ".join(types[:5]) + (f" (+{len(types) - 5} more)" if len(types) > 5 else "") if types else "an object"
    return ZooError(f"Refusing to open {what} {path}: it holds {named}, which a weights-only load does not build "
                    f"(unpickling it could run code). Checkpoints written by this zoo never need that. If you trust "
                    f"the file and where it came from, pass {flag} to load it with full pickle; otherwise ask its "
                    f"author for a .safetensors export or a checkpoint saved with plain tensors.")


def safe_load(path: str | Path, what: str = "checkpoint", trust: bool = False, flag: str = TRUST_FLAG,
              placeholders: bool = True) -> Any:
    """`torch.load` on the CPU that cannot run code: the one reader of every file from elsewhere.

    Weights-only (with `SAFE_GLOBALS`) first. A file that also holds other classes (a yacs `CfgNode` config, an
    `argparse.Namespace`, Lightning's `AttributeDict`, a `functools.partial`, ...) is read by
    `zoo.safe_load.read_as_data`, which puts an inert placeholder in place of each such object, never importing or
    calling its class, and one line on stderr names the classes it stood in for.

    Args:
        path: a file written by `torch.save`.
        what: how error messages name the file ("checkpoint", "token label file", ...).
        trust: load with full pickle (only for files the user explicitly trusts, via `flag`).
        flag: the command-line switch that sets `trust`, named in the refusal message.
        placeholders: False = weights-only strictly (e.g. `--resume`, whose file Lightning reads again): a file with
            other classes is refused, naming them.
    Raises:
        ZooError: the file needs a type outside the allow-list (named) and `placeholders` is off, or does not exist.
        Other exceptions of `torch.load` (corrupt files) propagate; callers word them.
    """
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"{what.capitalize()} not found: {path}.")
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    types = unsafe_types(path)  # read from the pickle's opcodes, nothing built
    if not types:
        try:
            with safe_globals():
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            types = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(e)) or unsafe_types(path)
            if not types:  # not a refused type: the file is corrupt or not a torch file; callers word that
                raise
    if not placeholders:
        raise refusal(path, types, what, flag)
    from zoo.safe_load import read_as_data, stood_in_line

    obj, stood_in = read_as_data(path)
    if stood_in:
        print(stood_in_line(path, stood_in), file=sys.stderr)
    return obj


def read_state_dict(path: str | Path, entries: tuple[str, ...] = ("state_dict", "model"), what: str = "checkpoint",
                    trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a released weight file, read through `safe_load` (or safetensors, no pickle at all).

    The first of `entries` the file holds is used (e.g. ("model_ema", "model") for VMamba's v0 release); a file that
    is itself a flat name -> tensor dict (`torch.save(model.state_dict())`, `model.safetensors`) is used as it is.
    A DataParallel `module.` prefix is removed. Non-tensor values (e.g. a `num_batches_tracked` int) are dropped.

    Raises:
        ZooError: the file is missing, unreadable, or holds none of `entries` (the message names what it holds).
    """
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"{what} {path}: file not found.")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
            raise ZooError(f"{what} {path}: cannot read it ({type(e).__name__}: {str(e)[:160]}); is it complete?"
                           ) from None
    else:
        try:
            raw = safe_load(path, what, trust=trust)
        except ZooError:
            raise
        except Exception as e:  # noqa: BLE001 - corrupt / truncated / not a torch file
            raise ZooError(f"{what} {path}: cannot read it ({type(e).__name__}: {str(e)[:160]}). The file is "
                           f"corrupt, cut off while downloading, or not a torch checkpoint.") from None
    if not isinstance(raw, dict):
        raise ZooError(f"{what} {path}: holds a {type(raw).__name__}, not a dict of weights.")
    state = next((raw[e] for e in entries if isinstance(raw.get(e), dict)), None)
    if state is None:
        if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
            state = raw
        else:
            raise ZooError(f"{what} {path}: none of {list(entries)} in it; it holds {sorted(map(str, raw))[:12]}.")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def is_safetensors(path: str | Path) -> bool:
    return Path(path).suffix == SAFETENSORS_SUFFIX


def read_checkpoint(path: str | Path, trust: bool = False, for_predict: bool = False,
                    weights_for: str | None = None, any_dict: bool = False) -> dict[str, Any]:
    """A zoo checkpoint as a dict (`state_dict`, `hyper_parameters`, ...), read safely on the CPU.

    `any_dict` returns any dict the file holds (a release file for the caller to convert) instead of requiring a
    `state_dict`. A `.safetensors` export gives {"state_dict", "hyper_parameters"} only; `weights_for` (the option that needs a full
    Lightning checkpoint, e.g. "--resume") refuses it. A missing, truncated, foreign or unsafe file raises a ZooError
    saying which and what to do; `for_predict` words the missing-file hint for predict.py.
    """
    path = Path(path)
    if not path.is_file():
        hint = ("Give the path of a .ckpt file written by train.py (runs are under checkpoints/<model>/<run>/) or a "
                ".safetensors export." if for_predict else
                "Give the path of a .ckpt file, or `--resume last` for the newest run of the model.")
        raise ZooError(f"Checkpoint not found: {path}. {hint}")
    if is_safetensors(path):
        if weights_for:
            raise ZooError(f"{weights_for} {path}: a .safetensors export holds the weights only, without the training "
                           f"state that {weights_for} needs. Give the run's .ckpt file; use the .safetensors file with "
                           f"predict.py.")
        return read_safetensors(path)
    if is_raw_pickle(path):
        raise ZooError(f"{path} is not a checkpoint: it is a plain Python pickle, not a file written by torch.save / "
                       f"train.py (nothing in it was run). Give a .ckpt written by train.py or a .safetensors export.")
    try:
        ckpt = safe_load(path, "checkpoint", trust=trust, placeholders=not weights_for)
    except ZooError:
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, pickle.UnpicklingError) as e:
        others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path)
        hint = f" Other checkpoints in that folder: {', '.join(others)}." if others else ""
        raise ZooError(f"Cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}. The file is corrupt or "
                       f"was cut off while saving (e.g. a full disk or a killed process).{hint}") from None
    if not isinstance(ckpt, dict) or ("state_dict" not in ckpt and not any_dict):
        raise ZooError(f"{path} is not a Lightning checkpoint (no 'state_dict'). Released upstream weights must be "
                       f"converted first: see checkpoints/README.md.")
    return ckpt


LEGACY_TORCH_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's pre-zip format opens with this pickled int


def is_raw_pickle(path: str | Path) -> bool:
    """True for a pickle stream that is neither torch.save's zip format nor its legacy format (read from the first
    bytes, nothing unpickled)."""
    with open(path, "rb") as f:
        head = f.read(16)
    return head[:1] == b"\x80" and LEGACY_TORCH_MAGIC not in head


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A `.safetensors` export as {"state_dict": tensors, "hyper_parameters": {"task", "config"}}; tied tensors the
    export stored once come back under each name."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ZooError(f"Cannot read {path}: {type(e).__name__}: {str(e)[:200]}. The file is corrupt or not a "
                       f"safetensors file.") from None
    if META_TASK not in meta or META_CONFIG not in meta:
        raise ZooError(f"{path} has no '{META_TASK}' / '{META_CONFIG}' metadata: it was not exported by this zoo. "
                       f"Export one with `python predict.py --ckpt X.ckpt export --format safetensors`.")
    for dropped, kept in meta.items():  # safetensors.torch.save_model records each dropped alias as name -> kept name
        if kept in state and dropped not in state and not dropped.startswith("zoo.") and dropped != "format":
            state[dropped] = state[kept]
    try:
        config = json.loads(meta[META_CONFIG])
    except ValueError as e:
        raise ZooError(f"{path}: the '{META_CONFIG}' metadata is not valid JSON ({e}).") from None
    return {"state_dict": state, "hyper_parameters": {"task": meta[META_TASK], "config": config}}


def checkpoint_task(ckpt: dict[str, Any], path: str | Path = "") -> str:
    """The registry name of the model a zoo checkpoint holds."""
    task = (ckpt.get("hyper_parameters") or {}).get("task")
    if not task:
        raise ZooError(f"Checkpoint {path} was not written by this zoo (no 'task' in its hyper-parameters). Released "
                       f"upstream weights must be converted first: see checkpoints/README.md.")
    return task


def find_last(model: str, root: Path) -> Path:
    """The newest `last.ckpt` under root/<model>/<run>/."""
    candidates = sorted((root / model).glob("*/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ZooError(f"--resume last: no run of '{model}' has a last.ckpt under {root / model}. Start a run first, "
                       f"or pass the checkpoint's path to --resume.")
    return candidates[-1]


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "", expected_task: str | None = None):
    """The task's LightningModule built from a checkpoint dict (as `read_checkpoint` returns), weights loaded, on the
    CPU, in eval mode. Equivalent to `Task.load_from_checkpoint` without reading the file a second time."""
    from zoo.bounded import fit_on_meta
    from zoo.registry import get_entry

    task = checkpoint_task(ckpt, path)
    if expected_task and task != expected_task:
        raise ZooError(f"{path} holds a '{task}' model, not '{expected_task}'. Use a '{expected_task}' checkpoint, "
                       f"or run the '{task}' commands on it.")
    cls = get_entry(task).load("module")
    hp = ckpt.get("hyper_parameters") or {}
    fit_on_meta(cls, hp.get("config"), task, ckpt, path)  # config checked, shapes compared, before any allocation
    model = cls(config=hp.get("config"), task=task)
    model.on_load_checkpoint(ckpt)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=model.strict_loading)
    except RuntimeError as e:
        raise ZooError(f"{path}: the weights do not fit a '{task}' model built from the checkpoint's own config: "
                       f"{str(e)[:300]}") from None
    return model.eval()


def load_model(path: str | Path, map_location: str | torch.device = "cpu", expected_task: str | None = None,
               trust: bool = False, for_predict: bool = False):
    """Open any zoo checkpoint (`.ckpt`, or a `.safetensors` export) with the LightningModule of the task it was
    written by; returns the model in eval mode on `map_location`."""
    ckpt = read_checkpoint(path, trust=trust, for_predict=for_predict)
    return model_from_checkpoint(ckpt, path, expected_task).to(map_location)


def save_safetensors(model, path: str | Path) -> Path:
    """Write a zoo LightningModule's weights to `path` with its task and config as JSON metadata (no pickle).

    Tensors that share storage (tied parameters) are stored once; `read_safetensors` restores every name.
    """
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {META_TASK: model.TASK, META_CONFIG: json.dumps(model.cfg.to_dict()), META_VERSION: "1"}
    was_training = model.training
    save_model(model.eval(), str(path), metadata=meta)
    model.train(was_training)
    return path
