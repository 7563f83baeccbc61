"""Reading KV Packet examples from a JSONL file: one ``{"documents": [str, ...], "question": str,
"answer": str (optional)}`` object per line.

Bad lines (not JSON, not an object, no ``documents`` list of non-empty strings, no non-empty
``question`` string, an ``answer`` that is not a string) are reported with their line number and
what was expected, as ``PATH:N: <reason>; expected <format>`` (:func:`scrimp.jsonl.read_jsonl`).
``on_error="stop"`` (the default) checks the whole file first and raises one ValueError listing the
bad lines, before anything is trained or written; ``on_error="skip"`` warns about each bad line and
keeps the good ones. Blank lines are ignored; other keys are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..jsonl import read_jsonl

__all__ = ["Example", "read_examples", "JSONL_FORMAT"]

JSONL_FORMAT = '{"documents": ["text", ...], "question": "text", "answer": "text" (optional)}'


@dataclass
class Example:
    """One line of a KV Packet JSONL file."""
    documents: List[str]
    question: str
    answer: Optional[str]
    line: int  # 1-based line number in the file


def _check(obj: dict, line: int) -> Example:
    """The Example of one line's JSON object; ValueError(reason) for a bad one."""
    if "documents" not in obj:
        raise ValueError("no 'documents' key (a list of strings)")
    docs = obj["documents"]
    if not isinstance(docs, list):
        raise ValueError(f"'documents' is {type(docs).__name__}, not a list of strings")
    if not docs:
        raise ValueError("'documents' is an empty list")
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise ValueError(f"'documents'[{i}] is {type(d).__name__}, not a string")
        if not d.strip():
            raise ValueError(f"'documents'[{i}] is empty text")
    if "question" not in obj:
        raise ValueError("no 'question' key (a string)")
    q = obj["question"]
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"'question' is not non-empty text: {q!r:.40}")
    a = obj.get("answer")
    if a is not None and (not isinstance(a, str) or not a.strip()):
        raise ValueError(f"'answer' (optional) is not non-empty text: {a!r:.40}")
    return Example(list(docs), q, a, line)


def read_examples(path: str, on_error: str = "stop") -> List[Example]:
    """The examples of a KV Packet JSONL file (see the module docstring for bad lines)."""
    return read_jsonl(path, _check, f"a JSON object {JSONL_FORMAT}", on_error=on_error)
