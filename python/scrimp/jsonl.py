"""Reading a user's JSONL data file into checked records, one JSON object per line, with every bad line
reported as ``PATH:N: <reason>; expected <what each line must be>``.

:func:`read_jsonl` does the reading for every method's data files: blank lines are ignored; a line that is
not UTF-8, not valid JSON (the column is given), not a JSON object, or that the caller's ``check``
refuses is a bad line. ``on_error="stop"`` checks the whole file first and raises one ValueError listing
the bad lines (the first 20 and how many more) before anything is returned; ``on_error="skip"`` warns
about each bad line and keeps the good ones. A file with no good line raises ValueError.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable, List

__all__ = ["read_jsonl", "DataFileNotFound", "MAX_LISTED"]

MAX_LISTED = 20  # bad lines quoted in the error of on_error="stop"


class DataFileNotFound(FileNotFoundError, ValueError):
    """No file at the given path (both a FileNotFoundError and a ValueError, so either handler sees it)."""


def _json_type(obj) -> str:
    return "null" if obj is None else type(obj).__name__


def read_jsonl(path, check: Callable[[dict, int], Any], expected: str, on_error: str = "stop") -> List[Any]:
    """The records ``check(obj, line_number)`` returns for the good lines of the JSONL file at ``path``.

    ``check`` gets each line's JSON object and its 1-based line number and raises ValueError(reason)
    for a bad one; ``expected`` says what every line must be (quoted in each error). See the module
    docstring for ``on_error``. TypeError for a ``path`` that is not a str or os.PathLike;
    :class:`DataFileNotFound` when there is no file there.
    """
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise DataFileNotFound(f"no data file at {path}")
    good: List[Any] = []
    bad: List[str] = []
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                reason = f"not UTF-8 text (byte {e.start + 1})"
            else:
                try:
                    obj = json.loads(text.rstrip())
                except json.JSONDecodeError as e:
                    reason = f"not valid JSON ({e.msg} at column {e.colno})"
                except RecursionError:
                    reason = "not valid JSON (nested too deeply)"
                else:
                    if not isinstance(obj, dict):
                        reason = f"got a JSON {_json_type(obj)}"
                    else:
                        try:
                            good.append(check(obj, no))
                            continue
                        except ValueError as e:
                            reason = str(e)
            msg = f"{path}:{no}: {reason}; expected {expected}"
            if on_error == "skip":
                warnings.warn(f"{msg} (line skipped)", stacklevel=2)
            bad.append(msg)
    if bad and on_error == "stop":
        shown = "\n  ".join(bad[:MAX_LISTED])
        more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise ValueError(f"{len(bad)} bad line(s) in {path}; nothing was done:\n  {shown}{more}")
    if not good:
        raise ValueError(f"{path}: no usable lines (the file is empty or every line was skipped); "
                         f"expected one {expected} per line")
    return good
