"""One error type for everything a user can get wrong: it says what is wrong and how to fix it, with no traceback."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ZooError(Exception):
    """A user-facing error: `train.py` and `predict.py` print its message as one paragraph and exit with status 2.

    Write the message as: what was wrong (naming the file, field or value), then the fix.
    """


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' Did you mean X?' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, valid: Iterable[str], fix: str = "") -> ZooError:
    """Error for a name that is not among `valid`, listing the valid ones."""
    valid = sorted(valid)
    return ZooError(f"Unknown {kind} '{name}'.{did_you_mean(name, valid)} Valid {kind}s: {', '.join(valid)}.{(' ' + fix) if fix else ''}")


def user_message(error: ZooError) -> str:
    """The message to print. A ZooError raised in a DataLoader worker arrives wrapped in the worker's traceback text;
    only our own paragraph is kept."""
    text = str(error)
    marker = "ZooError: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
