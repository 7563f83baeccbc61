"""The TESSY synthesis loop (paper section 3, official ``run_tessy.py``).

For every problem:

1. the *student* writes the first span; the active model generates up to ``k``
   tokens (``teacher_step`` / ``student_step``; paper 20, code 10 / 5);
2. the active model's boundary predictor reads the trace plus the new text and
   cuts at the first boundary (the boundary token kept, the cut extended so that no
   word is split); the kept text is appended to the shared trace; on a cut the
   roles switch, otherwise the same model continues;
3. the end-of-thinking marker ends the thinking (text after it is dropped), and the
   *student* writes the final answer in one call;
4. abort on total length, on a repeated fragment (checked every
   ``repetition_check_every`` steps), on an empty reply, on a backend error; a
   failed problem is retried up to ``max_retries`` times, then a failure record is
   written.

Many problems progress concurrently (``concurrency`` workers); with the local
backend their requests are batched into one ``generate`` call per model.
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .backends import Backend, BackendError, GenParams, MicroBatcher
from .output import JsonlWriter, finished_ids
from .predictor import EXTEND_MODES, Predictor

__all__ = ["TessyConfig", "synthesize", "run_synthesis", "find_repetition", "build_prompt",
           "problem_id", "parse_shard", "check_think_markers"]


@dataclass
class TessyConfig:
    teacher_step: int = 20
    student_step: int = 20
    max_total_tokens: int = 38000
    answer_max_tokens: int = 1024
    max_retries: int = 5
    repetition_check_every: int = 100
    repetition_window_chars: int = 1000
    concurrency: int = 100
    extend: str = "word"
    min_span_tokens: int = 1
    think_open: str = "<think>"
    think_close: str = "</think>"
    first: str = "student"
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    answer_temperature: Optional[float] = None

    def validate(self):
        for k in ("teacher_step", "student_step", "max_total_tokens", "answer_max_tokens", "concurrency",
                  "repetition_check_every", "min_span_tokens"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.extend not in EXTEND_MODES:
            raise ValueError(f"extend must be one of {EXTEND_MODES}")
        if self.first not in ("student", "teacher"):
            raise ValueError("first must be 'student' or 'teacher'")
        if not self.think_close:
            raise ValueError("think_close must be a non-empty marker")
        self.params.validate()
        return self

    @property
    def params(self) -> GenParams:
        return GenParams(self.temperature, self.top_p, self.top_k)

    @property
    def answer_params(self) -> GenParams:
        t = self.temperature if self.answer_temperature is None else self.answer_temperature
        return GenParams(t, self.top_p, self.top_k)


# ----------------------------------------------------------------------------- helpers

def problem_id(prompt: str) -> str:
    return hashlib.md5(prompt.encode("utf-8")).hexdigest()


def parse_shard(spec: Optional[str]):
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    if spec is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def _is_symbolic(s: str) -> bool:
    return re.fullmatch(r"[-=_*~^#<>|\\/.,!?:;()\[\]{}+\s]+", s) is not None


def find_repetition(text: str, min_len: int = 3, min_times: int = 8, max_len: int = 50) -> Optional[str]:
    """A fragment of ``min_len``..``max_len`` whitespace-separated words repeated at
    least ``min_times`` times in a row (purely symbolic fragments ignored), or None."""
    words = text.split()
    n = len(words)
    for L in range(min_len, min(max_len, n // min_times) + 1):
        i = 0
        while i + L * min_times <= n:
            frag = words[i:i + L]
            if all(words[i + t * L:i + (t + 1) * L] == frag for t in range(1, min_times)):
                s = " ".join(frag)
                if not _is_symbolic(s):
                    return s
                i += L * min_times
            else:
                i += 1
    return None


def check_think_markers(backend: Backend, cfg: TessyConfig) -> None:
    """Refuse a model whose tokenizer lacks the thinking markers as single tokens."""
    tok = backend.tokenizer
    if tok is None:
        return
    vocab = tok.get_vocab()
    for marker in (cfg.think_open, cfg.think_close):
        if marker and marker not in vocab:
            ids = tok(marker, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(
                    f"model {backend.name!r} has no thinking marker {marker!r} in its vocabulary (it encodes "
                    f"to {len(ids)} tokens): TESSY needs a reasoning model with {cfg.think_open}...{cfg.think_close}; "
                    f"set the markers with --think-open/--think-close")


def build_prompt(backend: Backend, prompt: str, cfg: TessyConfig, template: Optional[str] = None) -> str:
    """The prompt text for one model: its chat template (user turn + generation
    prompt) or ``template`` with ``{prompt}``, followed by the opening think marker."""
    if template is not None:
        if "{prompt}" not in template:
            raise ValueError("a prompt template must contain {prompt}")
        text = template.replace("{prompt}", prompt)
    else:
        tok = backend.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError(f"model {backend.name!r}: no tokenizer chat template; pass a prompt template "
                             "with {prompt}")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    if cfg.think_open and not text.rstrip().endswith(cfg.think_open):
        text += cfg.think_open
    return text


@dataclass
class _Span:
    source: str
    text: str
    tokens: int
    phase: str = "think"
    boundary: bool = False


class _Failure(Exception):
    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason


# ----------------------------------------------------------------------------- the loop

class _Run:
    def __init__(self, teacher, student, teacher_predictor, student_predictor, cfg, counter,
                 teacher_template=None, student_template=None):
        self.backends = {"teacher": teacher, "student": student}
        self.predictors = {"teacher": teacher_predictor, "student": student_predictor}
        self.cfg = cfg
        self.counter = counter
        self.templates = {"teacher": teacher_template, "student": student_template}
        self.batchers = {
            role: MicroBatcher(self._cut_fn(p), max_batch=256) for role, p in self.predictors.items()}
        self.models = {"teacher": teacher.name, "student": student.name,
                       "teacher_predictor": teacher_predictor.describe(),
                       "student_predictor": student_predictor.describe()}

    def _cut_fn(self, predictor: Predictor):
        cfg = self.cfg

        def fn(items):
            return predictor.cut_batch([c for c, _ in items], [g for _, g in items], extend=cfg.extend,
                                       min_span_tokens=cfg.min_span_tokens)
        return fn

    def count(self, text: str) -> int:
        return self.counter(text)

    async def attempt(self, prob: dict) -> dict:
        cfg = self.cfg
        prompts = {r: build_prompt(self.backends[r], prob["prompt"], cfg, self.templates[r])
                   for r in ("teacher", "student")}
        prompt_tokens = self.count(prompts["student"])
        if prompt_tokens + 1 >= cfg.max_total_tokens:
            raise _Failure("prompt_too_long", f"prompt has {prompt_tokens} tokens >= max_total_tokens")
        trace, spans = "", []
        role, steps, used = cfg.first, 0, prompt_tokens
        while True:
            k = cfg.teacher_step if role == "teacher" else cfg.student_step
            try:
                res = await self.backends[role].generate(prompts[role] + trace, k, cfg.params)
            except BackendError as e:
                raise _Failure("error", str(e))
            text = res.text
            if not text or not text.strip():
                raise _Failure("empty", f"the {role} returned an empty reply at step {steps}")
            cut = await self.batchers[role].submit((trace, text))
            combined = trace + cut.text
            end = combined.find(cfg.think_close)
            if end >= 0:  # end of thinking: drop whatever follows the marker
                new_trace = combined[:end] + cfg.think_close
                keep = len(trace)
                if end < keep:  # the marker began in the previous span: trim the spans
                    keep = end
                    spans, acc = list(spans), 0
                    for j, s in enumerate(spans):
                        if acc + len(s.text) > keep:
                            s.text = s.text[:keep - acc]
                            s.tokens = self.count(s.text)
                            spans = spans[:j + 1]
                            break
                        acc += len(s.text)
                    spans = [s for s in spans if s.text]
                piece = new_trace[keep:]
            else:
                new_trace, piece = combined, cut.text
            ntok = self.count(piece)
            spans.append(_Span(role, piece, ntok, "think", cut.boundary))
            trace = new_trace
            used += ntok
            steps += 1
            if used >= cfg.max_total_tokens:
                raise _Failure("length", f"the trace reached {used} tokens (max_total_tokens {cfg.max_total_tokens})")
            if end >= 0:
                break
            if cut.boundary:
                role = "student" if role == "teacher" else "teacher"
            if steps % cfg.repetition_check_every == 0:
                frag = find_repetition(trace[-cfg.repetition_window_chars:])
                if frag is not None:
                    raise _Failure("repetition", f"repeated fragment {frag[:80]!r}")
        # the student writes the final answer in one call
        budget = min(cfg.answer_max_tokens, cfg.max_total_tokens - used)
        if budget < 1:
            raise _Failure("length", "no token budget left for the answer")
        try:
            res = await self.backends["student"].generate(prompts["student"] + trace, budget, cfg.answer_params)
        except BackendError as e:
            raise _Failure("error", str(e))
        if not res.text or not res.text.strip():
            raise _Failure("empty", "the student returned an empty final answer")
        if res.finish_reason == "length":
            raise _Failure("answer_length", f"the final answer did not end within {budget} tokens")
        spans.append(_Span("student", res.text, self.count(res.text), "answer", False))
        return self._record(prob, trace, res.text, spans, steps)

    def _record(self, prob, trace, answer_text, spans, steps) -> dict:
        cfg = self.cfg
        total = sum(s.tokens for s in spans)
        stu = sum(s.tokens for s in spans if s.source == "student")
        think = [s for s in spans if s.phase == "think"]
        think_total = sum(s.tokens for s in think)
        think_stu = sum(s.tokens for s in think if s.source == "student")
        thinking = cfg.think_open + trace
        rec = {
            "id": prob["id"], "prompt": prob["prompt"], "status": "ok", "finish_reason": "stop",
            "thinking": thinking, "answer": answer_text.strip(), "completion": thinking + answer_text,
            "spans": [asdict(s) for s in spans],
            "n_tokens": {"total": total, "student": stu, "teacher": total - stu,
                         "think_total": think_total, "think_student": think_stu},
            "student_token_share": stu / total if total else 0.0,
            "student_think_share": think_stu / think_total if think_total else 0.0,
            "steps": steps, "models": self.models,
        }
        return rec


def _failure_record(prob, reason, message, attempts, models) -> dict:
    return {"id": prob["id"], "prompt": prob["prompt"], "status": "failed", "finish_reason": reason,
            "error": message, "attempts": attempts, "models": models, "spans": [],
            "n_tokens": {"total": 0, "student": 0, "teacher": 0}, "student_token_share": 0.0}


def _normalise_problems(problems) -> List[dict]:
    out, seen = [], set()
    for i, p in enumerate(problems):
        if isinstance(p, str):
            p = {"prompt": p}
        if not isinstance(p, dict) or not isinstance(p.get("prompt"), str) or not p["prompt"]:
            raise ValueError(f"problem {i}: need a dict with a non-empty 'prompt' string")
        q = dict(p)
        q["id"] = str(q.get("id") or problem_id(q["prompt"]))
        if q["id"] in seen:
            raise ValueError(f"duplicate problem id {q['id']!r}")
        seen.add(q["id"])
        out.append(q)
    return out


async def synthesize(problems, teacher: Backend, student: Backend, teacher_predictor: Predictor,
                     student_predictor: Predictor, config: Optional[TessyConfig] = None,
                     out_path: Optional[str] = None, shard=None, retry_failed: bool = False,
                     counter: Optional[Callable[[str], int]] = None, progress: bool = False,
                     teacher_template: Optional[str] = None, student_template: Optional[str] = None,
                     on_record: Optional[Callable[[dict], None]] = None) -> dict:
    """Run TESSY over ``problems`` (dicts with ``prompt`` and optional ``id`` and
    ``reference``: the expected answer, kept in the record) and append one record per
    problem to ``out_path``. Ids already in ``out_path`` are skipped (failed ones too,
    unless ``retry_failed``). ``shard=(i, n)`` keeps problems ``i, i+n, ...``.
    Token counts use ``counter(text)``; default: the student's tokenizer. Returns a
    summary (``records``, ``ok``, ``failed``, ``skipped``, ``seconds``, ...)."""
    cfg = (config or TessyConfig()).validate()
    if teacher_predictor.role != "teacher" or student_predictor.role != "student":
        raise ValueError("pass the teacher's predictor (role 'teacher') and the student's (role 'student')")
    for b in (teacher, student):
        check_think_markers(b, cfg)
    probs = _normalise_problems(problems)
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if shard is not None:
        probs = [p for j, p in enumerate(probs) if j % shard[1] == shard[0]]
    done = finished_ids(out_path, retry_failed=retry_failed) if out_path else set()
    todo = [p for p in probs if p["id"] not in done]
    skipped = len(probs) - len(todo)
    if counter is None:
        tok = student.tokenizer or teacher.tokenizer or getattr(student_predictor, "tokenizer", None)
        if tok is None:
            raise ValueError("no tokenizer to count tokens with: pass counter= or give the student a tokenizer")
        counter = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    run = _Run(teacher, student, teacher_predictor, student_predictor, cfg, counter,
               teacher_template, student_template)
    writer = JsonlWriter(out_path) if out_path else None
    queue: asyncio.Queue = asyncio.Queue()
    for p in todo:
        queue.put_nowait(p)
    summary = {"records": 0, "ok": 0, "failed": 0, "skipped": skipped, "attempts": 0, "tokens": 0,
               "student_tokens": 0, "failures": {}}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="tessy", mininterval=2.0, file=sys.stderr)
    t0 = time.time()

    async def worker():
        while True:
            try:
                prob = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            rec, last = None, ("error", "no attempt")
            for attempt in range(1, cfg.max_retries + 2):
                summary["attempts"] += 1
                t1 = time.time()
                try:
                    rec = await run.attempt(prob)
                    rec["attempts"] = attempt
                    rec["elapsed_s"] = round(time.time() - t1, 3)
                    break
                except _Failure as f:
                    last = (f.reason, f.message)
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception as e:  # a bug or a predictor crash: this problem fails, the run goes on
                    last = ("error", f"{type(e).__name__}: {e}")
                summary["failures"][last[0]] = summary["failures"].get(last[0], 0) + 1
            if rec is None:
                rec = _failure_record(prob, last[0], last[1], cfg.max_retries + 1, run.models)
            for k in ("reference", "meta"):
                if k in prob:
                    rec[k] = prob[k]
            rec["config"] = {"teacher_step": cfg.teacher_step, "student_step": cfg.student_step,
                             "extend": cfg.extend, "temperature": cfg.temperature}
            if writer is not None:
                writer.append(rec)
            summary["records"] += 1
            if rec["status"] == "ok":
                summary["ok"] += 1
                summary["tokens"] += rec["n_tokens"]["total"]
                summary["student_tokens"] += rec["n_tokens"]["student"]
            else:
                summary["failed"] += 1
            if on_record is not None:
                on_record(rec)
            if bar is not None:
                bar.update(1)

    try:
        await asyncio.gather(*[worker() for _ in range(min(cfg.concurrency, max(1, len(todo))))])
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
        for b in (teacher, student):
            await b.aclose()
    summary["seconds"] = time.time() - t0
    summary["student_token_share"] = summary["student_tokens"] / summary["tokens"] if summary["tokens"] else 0.0
    summary["problems_per_minute"] = 60.0 * summary["records"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    return summary


def run_synthesis(*args, **kwargs) -> dict:
    """Synchronous wrapper of :func:`synthesize` (runs its own event loop)."""
    return asyncio.run(synthesize(*args, **kwargs))
