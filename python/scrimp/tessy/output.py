"""TESSY output files: crash-safe JSONL, resume, statistics, SFT conversion.

One JSON object per line and per problem. Every record is written as one whole
line with a single ``write`` on an ``O_APPEND`` descriptor, then ``fsync``; a run
killed at any moment leaves at most a torn *last* line, which
:class:`JsonlWriter` drops when the file is opened again (the problem it held
was in flight and is redone).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, Iterable, Iterator, List, Optional

__all__ = ["JsonlWriter", "read_records", "record_problem", "latest_records", "finished_ids", "stats", "format_stats",
           "to_chat_records", "write_chat", "repair_jsonl"]


def repair_jsonl(path: str) -> int:
    """Drop a torn last line (one not ended by a newline). Returns the bytes removed."""
    if not os.path.exists(path):
        return 0
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # find the last newline
        pos = size - 1
        chunk = 65536
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


class JsonlWriter:
    """Append-only, crash-safe JSONL writer (whole line, flush, fsync)."""

    def __init__(self, path: str, fsync: bool = True):
        self.path = path
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        self.repaired_bytes = repair_jsonl(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fsync = fsync
        self.written = 0

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self._fsync:
            os.fsync(self._fd)
        self.written += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def record_problem(rec) -> Optional[str]:
    """Why ``rec`` is not a TESSY output record this module can use, or None when it is.

    Required: ``id`` (str or int) and ``status`` ("ok" or "failed") - all that resume needs. Optional
    fields must have their types when present: ``n_tokens`` with non-negative int ``total``/``student``
    (and ``think_*``), ``spans`` a list, ``prompt``/``completion``/``answer``/``finish_reason``
    strings, ``attempts`` a count, ``student_token_share`` a number (readers default the missing). Output
    files are outside data (a rerun resumes from them), so anything else is skipped with a warning by
    :func:`latest_records` (resume, stats, convert), never trusted."""
    if not isinstance(rec, dict):
        return f"a record must be a JSON object, got {type(rec).__name__}"
    if not isinstance(rec.get("id"), (str, int)) or isinstance(rec.get("id"), bool):
        return "missing or non-string id"
    if rec.get("status") not in ("ok", "failed"):
        return f"status must be 'ok' or 'failed', got {rec.get('status')!r}"
    n = rec.get("n_tokens")
    if n is not None:
        if not isinstance(n, dict) or not _is_count(n.get("total")) or not _is_count(n.get("student")):
            return "n_tokens must hold non-negative int total and student counts"
        if n["student"] > n["total"]:
            return "n_tokens.student exceeds n_tokens.total"
        for k in ("think_total", "think_student"):
            if k in n and not _is_count(n[k]):
                return f"n_tokens.{k} must be a non-negative int"
    if not isinstance(rec.get("spans", []), list):
        return "spans must be a list"
    if not isinstance(rec.get("finish_reason", ""), str):
        return "finish_reason must be a string"
    if "attempts" in rec and not _is_count(rec["attempts"]):
        return "attempts must be a non-negative int"
    share = rec.get("student_token_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        return "student_token_share must be a number"
    if "models" in rec and not isinstance(rec["models"], dict):
        return "models must be an object"
    for k in ("prompt", "completion", "answer"):
        if k in rec and not isinstance(rec[k], str):
            return f"{k} must be a string"
    return None


def read_records(path: str, warn=True) -> Iterator[dict]:
    """JSON objects of a JSONL file (problems, labelled spans, TESSY output); unreadable lines (a torn
    last line, bytes that are not UTF-8 JSON) and non-object lines are skipped with a warning."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                if warn:
                    print(f"warning: {path}:{n}: skipping an unreadable line", file=sys.stderr)
                continue
            if isinstance(rec, dict):
                yield rec


def latest_records(path: str) -> Dict[str, dict]:
    """id -> the last record written for it (a rerun's record supersedes a failure)."""
    out = {}
    for n, r in enumerate(read_records(path), 1):
        why = record_problem(r)
        if why is not None:
            print(f"warning: {path}: skipping malformed record {n} ({why})", file=sys.stderr)
            continue
        out[str(r["id"])] = r
    return out


def finished_ids(path: str, retry_failed: bool = False) -> set:
    """Ids a rerun skips: all written ids, or only successful ones with ``retry_failed``."""
    return {i for i, r in latest_records(path).items() if not retry_failed or r.get("status") == "ok"}


def stats(path_or_records) -> dict:
    recs = list(latest_records(path_or_records).values()) if isinstance(path_or_records, str) else \
        [r for r in path_or_records if record_problem(r) is None]
    ok = [r for r in recs if r.get("status") == "ok"]
    reasons: Dict[str, int] = {}
    for r in recs:
        reasons[r.get("finish_reason", "?")] = reasons.get(r.get("finish_reason", "?"), 0) + 1
    counts = [r.get("n_tokens") or {} for r in ok]
    tot = sum(c.get("total", 0) for c in counts)
    stu = sum(c.get("student", 0) for c in counts)
    think_tot = sum(c.get("think_total", 0) for c in counts)
    think_stu = sum(c.get("think_student", 0) for c in counts)
    graded = [r for r in ok if r.get("reference") is not None]
    correct = sum(1 for r in graded if str(r.get("answer", "")).strip() == str(r["reference"]).strip())
    n_spans = sum(len(r.get("spans", [])) for r in ok)
    models = sorted({json.dumps(r.get("models", {}), sort_keys=True) for r in recs})
    return {
        "records": len(recs), "ok": len(ok), "failed": len(recs) - len(ok), "finish_reasons": reasons,
        "tokens_total": tot, "tokens_student": stu,
        "student_token_share": stu / tot if tot else 0.0,
        "student_think_share": think_stu / think_tot if think_tot else 0.0,
        "mean_record_student_share": sum(r.get("student_token_share", 0.0) for r in ok) / len(ok) if ok else 0.0,
        "mean_tokens": tot / len(ok) if ok else 0.0,
        "mean_spans": n_spans / len(ok) if ok else 0.0,
        "mean_attempts": sum(r.get("attempts", 1) for r in recs) / len(recs) if recs else 0.0,
        "graded": len(graded), "answer_accuracy": correct / len(graded) if graded else None,
        "models": [json.loads(m) for m in models],
    }


def format_stats(s: dict) -> str:
    lines = [f"records            {s['records']} ({s['ok']} ok, {s['failed']} failed)",
             "finish reasons     " + ", ".join(f"{k}={v}" for k, v in sorted(s["finish_reasons"].items())),
             f"tokens (ok)        {s['tokens_total']} total, {s['tokens_student']} from the student",
             f"student share      {100 * s['student_token_share']:.1f}% of all tokens, "
             f"{100 * s['student_think_share']:.1f}% of the thinking tokens",
             f"per record         {s['mean_tokens']:.1f} tokens, {s['mean_spans']:.1f} spans, "
             f"{s['mean_attempts']:.2f} attempts"]
    if s["answer_accuracy"] is not None:
        lines.append(f"answer accuracy    {100 * s['answer_accuracy']:.1f}% of {s['graded']} graded")
    for m in s["models"]:
        lines.append("models             " + ", ".join(f"{k}={v}" for k, v in sorted(m.items())))
    return "\n".join(lines)


def to_chat_records(records: Iterable[dict], only_ok: bool = True, system: Optional[str] = None) -> List[dict]:
    """Chat-format SFT records: ``{"id", "messages": [user, assistant]}`` where the
    assistant turn is the whole synthesized completion (thinking + answer)."""
    out = []
    for r in records:
        if (only_ok and r.get("status") != "ok") or not isinstance(r.get("completion"), str) \
                or not isinstance(r.get("prompt"), str):
            continue  # a failure record has no completion
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": "user", "content": r["prompt"]},
                 {"role": "assistant", "content": r["completion"]}]
        out.append({"id": r["id"], "messages": msgs, "student_token_share": r.get("student_token_share")})
    return out


def write_chat(path_in: str, path_out: str, fmt: str = "jsonl", only_ok: bool = True,
               system: Optional[str] = None) -> int:
    """Convert a TESSY file to chat SFT records: ``fmt="jsonl"`` or ``"datasets"``
    (a Hugging Face ``datasets`` dataset saved with ``save_to_disk``; needs the
    ``datasets`` package). Returns the number of records."""
    recs = to_chat_records(latest_records(path_in).values(), only_ok=only_ok, system=system)
    if fmt == "jsonl":
        tmp = path_out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path_out)
    elif fmt == "datasets":
        try:
            import datasets
        except ImportError as e:
            raise RuntimeError("format 'datasets' needs the `datasets` package (pip install datasets); "
                               "use --format jsonl instead") from e
        datasets.Dataset.from_list(recs).save_to_disk(path_out)
    else:
        raise ValueError(f"unknown format {fmt!r}: use jsonl or datasets")
    return len(recs)
