"""Reading KV Packet examples from a JSONL file: one ``{"documents": [str, ...], "question": str,
"answer": str (optional)}`` object per line.

Bad lines (not JSON, not an object, no ``documents`` list of non-empty strings, no non-empty
``question`` string, an ``answer`` that is not a string) are reported with their line number and
what was expected. ``on_error="stop"`` (the default) checks the whole file first and raises one
ValueError listing every bad line, before anything is trained or written; ``on_error="skip"`` warns
about each bad line and keeps the good ones. Blank lines are ignored; other keys are ignored.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

__all__ = ["Example", "read_examples", "JSONL_FORMAT"]

JSONL_FORMAT = '{"documents": ["text", ...], "question": "text", "answer": "text" (optional)}'


@dataclass
class Example:
    """One line of a KV Packet JSONL file."""
    documents: List[str]
    question: str
    answer: Optional[str]
    line: int  # 1-based line number in the file


def _check(obj) -> Tuple[Optional[Example], Optional[str]]:
    if not isinstance(obj, dict):
        return None, f"a JSON object, got {type(obj).__name__}"
    docs = obj.get("documents")
    if "documents" not in obj:
        return None, "a 'documents' key (a list of strings)"
    if not isinstance(docs, list):
        return None, f"'documents' to be a list of strings, got {type(docs).__name__}"
    if not docs:
        return None, "'documents' to hold at least one document, got an empty list"
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            return None, f"'documents'[{i}] to be a string, got {type(d).__name__}"
        if not d.strip():
            return None, f"'documents'[{i}] to be non-empty text"
    if "question" not in obj:
        return None, "a 'question' key (a string)"
    q = obj["question"]
    if not isinstance(q, str) or not q.strip():
        return None, f"'question' to be non-empty text, got {q!r:.40}"
    a = obj.get("answer")
    if a is not None and (not isinstance(a, str) or not a.strip()):
        return None, f"'answer' (optional) to be non-empty text, got {a!r:.40}"
    return Example(list(docs), q, a, 0), None


def read_examples(path: str, on_error: str = "stop") -> List[Example]:
    """The examples of a KV Packet JSONL file (see the module docstring for bad lines)."""
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file at {path}")
    good: List[Example] = []
    bad: List[str] = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                ex, why = None, f"one JSON object per line ({e.msg} at column {e.colno})"
            else:
                ex, why = _check(obj)
            if ex is None:
                msg = f"{path}:{no}: expected {why}"
                if on_error == "skip":
                    warnings.warn(f"{msg}; line skipped", stacklevel=2)
                bad.append(msg)
                continue
            ex.line = no
            good.append(ex)
    if bad and on_error == "stop":
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(f"{len(bad)} bad line(s) in {path} (each line must be {JSONL_FORMAT}); nothing was "
                         f"done:\n  {shown}")
    if not good:
        raise ValueError(f"{path} holds no usable examples (each line must be {JSONL_FORMAT})")
    return good
