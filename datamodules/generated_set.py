"""The record a generated set keeps of itself, `<set>/.generation.json`, and the notice its readers give when the set
is incomplete.

`predict.py --ckpt PALM generate` writes the record before it samples anything (what was asked: counts, seed, steps,
variation, method, weights, the command) with `"status": "running"`, updates `"completed"` (individuals written) as
each individual's folder is renamed into place, and ends with `"status": "complete"` (or "interrupted" / "failed").
Every `<set>/id_XXXXX/` folder is written under a hidden temporary name and renamed when all its images are on disk,
so a folder that exists is complete; the readers (`train.py --data-dir`, `evaluate-identity`) skip hidden names.
A record without "status" was written by an older version, at the end of a finished run: complete.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

RECORD = ".generation.json"


def read_record(root: str | Path) -> dict[str, Any] | None:
    """The set's record, or None when there is none (or it is not a JSON object)."""
    path = Path(root) / RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_record(root: str | Path, data: dict[str, Any]) -> None:
    """Write the record whole or not at all (a temporary file renamed over the old one)."""
    path = Path(root) / RECORD
    tmp = path.with_name(RECORD + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def incomplete_notice(root: str | Path) -> str:
    """One line saying that the generated set at `root` is incomplete, with the command that finishes it; '' when
    `root` is not a generated set or the set is complete."""
    record = read_record(root)
    if record is None or record.get("status", "complete") == "complete":
        return ""
    done, total = record.get("completed", "?"), record.get("individuals", "?")
    why = {"running": "still being written, or stopped without a word (killed)", "interrupted": "interrupted",
           "failed": "stopped by an error"}.get(record.get("status"), record.get("status"))
    finish = record.get("command") or "the generate command that wrote it, again"
    return (f"warning: {root} is an incomplete generated set: {done} of {total} individuals were written "
            f"(generation {why}). Finish it with the same command: {finish}")


def warn_if_incomplete(*roots: str | Path) -> None:
    """Print `incomplete_notice` (stderr) for each distinct folder that is an incomplete generated set."""
    for root in dict.fromkeys(Path(r) for r in roots):
        notice = incomplete_notice(root)
        if notice:
            print(notice, file=sys.stderr)
