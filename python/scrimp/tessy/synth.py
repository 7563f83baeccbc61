"""The TESSY synthesis loop (paper section 3, official ``run_tessy.py``).

For every problem:

1. the *student* writes the first span; the active model generates up to ``k``
   tokens (``teacher_step`` / ``student_step``; paper 20, code 10 / 5);
2. the active model's boundary predictor reads the trace plus the new text and
   cuts at the first boundary (the boundary token kept, the cut extended so that no
   word is split); the kept text is appended to the shared trace; on a cut the
   roles switch, otherwise the same model continues;
3. the end-of-thinking marker ends the thinking (text after it is dropped), and the
   *student* writes the final answer in one call, given the trace ending with its own
   marker; when the teacher's span reaches the marker, the teacher's text up to the
   marker is kept and the student first closes the thinking with one span (its closing
   phrase and marker), or, when it writes no marker of its own within that span, the
   thinking ends where the teacher ended it;
4. abort on total length (``max_total_tokens``, or a trace that fills a remote
   model's context), on a repeated fragment (checked every
   ``repetition_check_every`` steps), on an empty reply, on a backend error; a
   failed problem is retried up to ``max_retries`` times, then a failure record is
   written; a request the server refused (HTTP 4xx) fails the problem at once.

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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .backends import Backend, BackendError, GenParams, MicroBatcher
from .output import JsonlWriter, finished_ids
from .predictor import EXTEND_MODES, Predictor

__all__ = ["TessyConfig", "SAMPLING_PRESETS", "synthesize", "run_synthesis", "find_repetition", "build_prompt",
           "problem_id", "parse_shard", "check_think_markers", "check_marker_pair", "read_problems",
           "normalise_problem"]


#: named sampling settings: ``tessy`` is the official code's (temperature 0.7, top-p 0.8, top-k 20),
#: ``greedy`` is temperature 0 (top-p and top-k off)
SAMPLING_PRESETS = {
    "tessy": {"temperature": 0.7, "top_p": 0.8, "top_k": 20},
    "greedy": {"temperature": 0.0, "top_p": 1.0, "top_k": 0},
}


@dataclass
class TessyConfig:
    """Loop settings. Think markers: ``think_open`` / ``think_close`` for both models, or per model
    with ``teacher_think_open`` ... ``student_think_close`` (``None``: the shared one). Markers are
    text, one or several tokens each; the record is written with the student's markers."""
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
    teacher_think_open: Optional[str] = None
    teacher_think_close: Optional[str] = None
    student_think_open: Optional[str] = None
    student_think_close: Optional[str] = None

    @classmethod
    def with_sampling(cls, preset: str = "tessy", **kw) -> "TessyConfig":
        """A config with the named :data:`SAMPLING_PRESETS` sampling; keyword arguments (any field,
        ``temperature`` / ``top_p`` / ``top_k`` too) override it."""
        if preset not in SAMPLING_PRESETS:
            raise ValueError(f"sampling preset must be one of {sorted(SAMPLING_PRESETS)}, got {preset!r}")
        return cls(**{**SAMPLING_PRESETS[preset], **kw})

    def markers(self, role: str) -> Tuple[str, str]:
        """``(open, close)`` think markers of ``role`` ("teacher" or "student")."""
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        o = getattr(self, f"{role}_think_open")
        c = getattr(self, f"{role}_think_close")
        return (self.think_open if o is None else o), (self.think_close if c is None else c)

    def validate(self):
        for k in ("teacher_step", "student_step", "max_total_tokens", "answer_max_tokens", "concurrency",
                  "repetition_check_every", "min_span_tokens"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an int >= 1, got {v!r}")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.extend not in EXTEND_MODES:
            raise ValueError(f"extend must be one of {EXTEND_MODES}")
        if self.first not in ("student", "teacher"):
            raise ValueError("first must be 'student' or 'teacher'")
        for role in ("teacher", "student"):
            check_marker_pair(*self.markers(role), role=role)
        self.params.validate()
        return self

    @property
    def params(self) -> GenParams:
        return GenParams(self.temperature, self.top_p, self.top_k)

    @property
    def answer_params(self) -> GenParams:
        t = self.temperature if self.answer_temperature is None else self.answer_temperature
        return GenParams(t, self.top_p, self.top_k)


def check_marker_pair(open_marker, close_marker, role: str = "model") -> None:
    """ValueError unless ``open_marker`` (may be empty: the prompt template opens the thinking) and
    ``close_marker`` (non-empty) are strings that can delimit a thinking block: no surrounding
    whitespace, not whitespace only, and neither inside the other."""
    for what, m in (("opening", open_marker), ("closing", close_marker)):
        if not isinstance(m, str):
            raise ValueError(f"the {role}'s {what} think marker must be a string, got {type(m).__name__}")
        if m and (not m.strip() or m != m.strip()):
            raise ValueError(f"the {role}'s {what} think marker {m!r} has leading/trailing whitespace or is only "
                             "whitespace; expected text such as '<think>' / '</think>'")
    if not close_marker:
        raise ValueError(f"the {role}'s closing think marker is empty; expected text such as '</think>'")
    if open_marker and (open_marker in close_marker or close_marker in open_marker):
        raise ValueError(f"the {role}'s think markers {open_marker!r} and {close_marker!r} contain one another: "
                         "the end of the thinking could not be told from its start")


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


def check_think_markers(backend: Backend, cfg: TessyConfig, role: str = "student") -> None:
    """Refuse a model whose tokenizer cannot write its thinking markers: each marker must survive
    encode + decode unchanged (one token or several). Registers the markers with the backend so that
    they are kept in its decoded text even when its tokenizer marks them as special tokens."""
    tok = backend.tokenizer
    markers = [m for m in cfg.markers(role) if m]
    keep = getattr(backend, "keep_special", None)
    if callable(keep):
        keep(markers)
    if tok is None:
        return
    for marker in markers:
        ids = list(tok(marker, add_special_tokens=False)["input_ids"])
        back = tok.decode(ids, skip_special_tokens=False) if ids else ""
        if back != marker:
            raise ValueError(
                f"model {backend.name!r} cannot write the thinking marker {marker!r}: its tokenizer encodes it to "
                f"{len(ids)} token(s) that decode to {back!r}; TESSY needs each model's own markers "
                f"(set them with --{role}-think-open/--{role}-think-close, or --think-open/--think-close for both)")


def _messages(prompt) -> List[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def build_prompt(backend: Backend, prompt, cfg: TessyConfig, template: Optional[str] = None,
                 role: str = "student") -> str:
    """The prompt text for one model: its chat template over ``prompt`` (a user message string, or a
    list of ``{"role", "content"}`` messages) with the generation prompt, or ``template`` with
    ``{prompt}`` (the last user message), followed by the model's opening think marker."""
    think_open = cfg.markers(role)[0]
    if template is not None:
        if "{prompt}" not in template:
            raise ValueError("a prompt template must contain {prompt}")
        text = template.replace("{prompt}", _messages(prompt)[-1]["content"])
    else:
        tok = backend.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError(f"model {backend.name!r}: no tokenizer chat template; pass a prompt template "
                             "with {prompt}")
        text = tok.apply_chat_template(_messages(prompt), tokenize=False, add_generation_prompt=True)
    if think_open and not text.rstrip().endswith(think_open):
        text += think_open
    return text


@dataclass
class _Span:
    source: str
    text: str
    tokens: int
    phase: str = "think"
    boundary: bool = False
    tokens_per_model: Optional[Dict[str, int]] = None


class _Failure(Exception):
    """A failed attempt; ``final``: retrying the problem would fail the same way (a request the server
    refused), so it is marked failed at once."""

    def __init__(self, reason: str, message: str = "", final: bool = False):
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason
        self.final = final


def _bind_tokenizer(predictor: Predictor, backend: Backend) -> Predictor:
    """A lexicon predictor without its own tokenizer reads the text as ``backend``'s tokenizer cuts it."""
    bind = getattr(predictor, "with_tokenizer", None)
    if callable(bind) and getattr(predictor, "tokenizer", True) is None and backend.tokenizer is not None:
        return bind(backend.tokenizer)
    return predictor


def _token_counter(tok) -> Callable[[str], int]:
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- the loop

class _Run:
    def __init__(self, teacher, student, teacher_predictor, student_predictor, cfg, counter,
                 teacher_template=None, student_template=None):
        self.backends = {"teacher": teacher, "student": student}
        self.predictors = {"teacher": teacher_predictor, "student": student_predictor}
        self.cfg = cfg
        self.counter = counter
        self.templates = {"teacher": teacher_template, "student": student_template}
        # token counts of the provenance in each model's own tokenizer (when both are known)
        self.model_counters = None
        if teacher.tokenizer is not None and student.tokenizer is not None:
            self.model_counters = {r: _token_counter(b.tokenizer) for r, b in self.backends.items()}
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

    def span(self, source, text, phase="think", boundary=False) -> _Span:
        per = {r: c(text) for r, c in self.model_counters.items()} if self.model_counters else None
        return _Span(source, text, self.count(text), phase, boundary, per)

    async def _generate(self, role, prompt, k, params, session):
        backend = self.backends[role]
        try:
            if getattr(backend, "incremental", False):
                return await backend.generate(prompt, k, params, session=session)
            return await backend.generate(prompt, k, params)
        except BackendError as e:
            reason = getattr(e, "reason", "error")
            # a refused request is final; a trace that filled the server's context ends like --max-tokens
            raise _Failure(reason, str(e), final=getattr(e, "permanent", False) and reason != "context_length")

    def _add(self, spans: List[_Span], used: Dict[str, int], sp: _Span) -> None:
        spans.append(sp)
        used["counter"] += sp.tokens
        for r, n in (sp.tokens_per_model or {}).items():
            used[r] += n

    async def _student_closing(self, prompt: str, trace: str, used: Dict[str, int], session) -> Optional[str]:
        """The teacher ended the thinking: the student, given ``trace`` (the thinking up to the teacher's
        marker, the marker excluded), writes one span (``student_step`` tokens). Its text up to and including
        its own closing marker when it writes one within the span, else None (the teacher's marker stands)."""
        cfg = self.cfg
        k = min(cfg.student_step, cfg.max_total_tokens - max(used.values()))
        if k < 1:
            return None
        res = await self._generate("student", prompt + trace, k, cfg.params, session)
        close = cfg.markers("student")[1]
        at = res.text.find(close)
        return res.text[:at + len(close)] if at >= 0 else None

    async def attempt(self, prob: dict) -> dict:
        session = object()  # this attempt's key for the backends' per-problem state (KV caches)
        try:
            return await self._attempt(prob, session)
        finally:
            for b in self.backends.values():
                b.end_session(session)

    async def _attempt(self, prob: dict, session) -> dict:
        cfg = self.cfg
        prompt = prob.get("messages") or prob["prompt"]
        prompts = {r: build_prompt(self.backends[r], prompt, cfg, self.templates[r], r)
                   for r in ("teacher", "student")}
        s_open, s_close = cfg.markers("student")
        used = {"counter": self.count(prompts["student"])}
        if self.model_counters:
            used.update({r: c(prompts[r]) for r, c in self.model_counters.items()})
        if max(used.values()) + 1 >= cfg.max_total_tokens:
            raise _Failure("prompt_too_long", f"prompt has {max(used.values())} tokens >= max_total_tokens")
        trace, spans = "", []
        role, steps = cfg.first, 0
        while True:
            k = cfg.teacher_step if role == "teacher" else cfg.student_step
            res = await self._generate(role, prompts[role] + trace, k, cfg.params, session)
            text = res.text
            if not text or not text.strip():
                raise _Failure("empty", f"the {role} returned an empty reply at step {steps}")
            cut = await self.batchers[role].submit((trace, text))
            combined = trace + cut.text
            close = cfg.markers(role)[1]  # the active model ends the thinking with its own marker
            end = combined.find(close, max(0, len(trace) - len(close) + 1))
            closing = None
            if end >= 0:  # end of thinking: drop whatever follows the marker, write the student's marker
                new_trace = combined[:end] + s_close
                keep = len(trace)
                if end < keep:  # the marker began in the previous span: trim the spans
                    keep = end
                    spans, acc = list(spans), 0
                    for j, sp in enumerate(spans):
                        if acc + len(sp.text) > keep:
                            spans[j] = self.span(sp.source, sp.text[:keep - acc], sp.phase, sp.boundary)
                            spans = spans[:j + 1]
                            break
                        acc += len(sp.text)
                    spans = [sp for sp in spans if sp.text]
                piece = new_trace[keep:]
            else:
                new_trace, piece = combined, cut.text
            if end >= 0 and role == "teacher":  # the student closes the thinking the teacher ended
                closing = await self._student_closing(prompts["student"], combined[:end], used, session)
                if closing is not None:
                    piece, new_trace = combined[keep:end], combined[:end] + closing
            if piece:
                self._add(spans, used, self.span(role, piece, "think", cut.boundary))
            if end >= 0 and role == "teacher" and closing is not None:
                self._add(spans, used, self.span("student", closing, "think", True))
            trace = new_trace
            steps += 1
            if max(used.values()) >= cfg.max_total_tokens:
                raise _Failure("length", f"the trace reached {max(used.values())} tokens "
                                         f"(max_total_tokens {cfg.max_total_tokens})")
            if end >= 0:
                break
            if cut.boundary:
                role = "student" if role == "teacher" else "teacher"
            if steps % cfg.repetition_check_every == 0:
                frag = find_repetition(trace[-cfg.repetition_window_chars:])
                if frag is not None:
                    raise _Failure("repetition", f"repeated fragment {frag[:80]!r}")
        # the student writes the final answer in one call
        budget = min(cfg.answer_max_tokens, cfg.max_total_tokens - max(used.values()))
        if budget < 1:
            raise _Failure("length", "no token budget left for the answer")
        res = await self._generate("student", prompts["student"] + trace, budget, cfg.answer_params, session)
        if not res.text or not res.text.strip():
            raise _Failure("empty", "the student returned an empty final answer")
        if res.finish_reason == "length":
            raise _Failure("answer_length", f"the final answer did not end within {budget} tokens")
        spans.append(self.span("student", res.text, "answer", False))
        return self._record(prob, s_open + trace, res.text, spans, steps)

    def _record(self, prob, thinking, answer_text, spans, steps) -> dict:
        total = sum(s.tokens for s in spans)
        stu = sum(s.tokens for s in spans if s.source == "student")
        think = [s for s in spans if s.phase == "think"]
        think_total = sum(s.tokens for s in think)
        think_stu = sum(s.tokens for s in think if s.source == "student")
        rec = {
            "id": prob["id"], "prompt": prob["prompt"], "status": "ok", "finish_reason": "stop",
            "thinking": thinking, "answer": answer_text.strip(), "completion": thinking + answer_text,
            "spans": [{k: v for k, v in asdict(s).items() if v is not None} for s in spans],
            "n_tokens": {"total": total, "student": stu, "teacher": total - stu,
                         "think_total": think_total, "think_student": think_stu},
            "student_token_share": stu / total if total else 0.0,
            "student_think_share": think_stu / think_total if think_total else 0.0,
            "steps": steps, "models": self.models,
        }
        if self.model_counters:
            per = {}
            for r in self.model_counters:
                t = sum(s.tokens_per_model[r] for s in spans)
                st = sum(s.tokens_per_model[r] for s in spans if s.source == "student")
                per[r] = {"total": t, "student": st, "teacher": t - st}
            rec["n_tokens_per_model"] = per
        if "messages" in prob:
            rec["messages"] = prob["messages"]
        return rec


def _failure_record(prob, reason, message, attempts, models) -> dict:
    return {"id": prob["id"], "prompt": prob["prompt"], "status": "failed", "finish_reason": reason,
            "error": message, "attempts": attempts, "models": models, "spans": [],
            "n_tokens": {"total": 0, "student": 0, "teacher": 0}, "student_token_share": 0.0}


PROBLEM_FORMAT = ('a JSON object with "prompt" (a non-empty string) or "messages" (a non-empty list of '
                  '{"role", "content"} objects ending with a user turn), optional "id" (string or integer) and '
                  '"reference" (or "answer")')


def normalise_problem(p) -> dict:
    """One problem as the loop uses it: ``{"prompt", "id"?, "messages"?, "reference"?, ...}``; a plain
    string is a prompt. ValueError saying what is wrong and what is expected otherwise."""
    try:
        return _problem(p)
    except ValueError as e:
        raise ValueError(f"{e}; expected {PROBLEM_FORMAT}") from None


def _problem(p) -> dict:
    """:func:`normalise_problem` without the expected format in its ValueError (the reason alone)."""
    if isinstance(p, str):
        p = {"prompt": p}
    if not isinstance(p, dict):
        raise ValueError(f"got {type(p).__name__}")
    q = dict(p)
    msgs = q.pop("dialogs", None) if "messages" not in q else q.get("messages")
    if msgs is not None:
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ValueError("\"messages\" is not a non-empty list of {role, content} strings")
        if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
            raise ValueError("the last message must be a non-empty user turn")
        q["messages"] = [{"role": m["role"], "content": m["content"]} for m in msgs]
        q.setdefault("prompt", msgs[-1]["content"])
    if not isinstance(q.get("prompt"), str) or not q["prompt"].strip():
        raise ValueError("no non-empty \"prompt\" string")
    if q.get("id") is not None:
        if isinstance(q["id"], bool) or not isinstance(q["id"], (str, int)):
            raise ValueError(f"\"id\" must be a string or an integer, got {type(q['id']).__name__}")
        q["id"] = str(q["id"])
    ref = q.pop("answer", None) if "reference" not in q else q["reference"]
    if ref is not None:
        q["reference"] = str(ref)
    return q


def read_problems(path: str) -> List[dict]:
    """Problems from a JSONL file, one :func:`normalise_problem` object per line (blank lines
    skipped). One ValueError listing every malformed line as ``path:line: <reason>; expected ...``
    (:func:`scrimp.jsonl.read_jsonl`); ValueError for a file with no problem."""
    from ..jsonl import read_jsonl
    return read_jsonl(path, lambda obj, line: _problem(obj), PROBLEM_FORMAT)


def _normalise_problems(problems) -> List[dict]:
    out, seen = [], set()
    for i, p in enumerate(problems):
        try:
            q = normalise_problem(p)
        except ValueError as e:
            raise ValueError(f"problem {i}: {e}") from None
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
    """Run TESSY over ``problems`` (prompt strings, or dicts with ``prompt`` or ``messages`` and
    optional ``id`` and ``reference``: the expected answer, kept in the record) and append one
    record per problem to ``out_path``. Ids already in ``out_path`` are skipped (failed ones too,
    unless ``retry_failed``). ``shard=(i, n)`` keeps problems ``i, i+n, ...``.
    Token counts (``n_tokens``, the length limit) use ``counter(text)``; default: the student's
    tokenizer; with both models' tokenizers known every span and record also carries the counts in
    each model's own tokenizer (``tokens_per_model``, ``n_tokens_per_model``). A lexicon predictor
    built without a tokenizer labels the tokens of its model's tokenizer. Returns a summary
    (``records``, ``ok``, ``failed``, ``skipped``, ``seconds``, ``problems_per_minute``, ...)."""
    cfg = (config or TessyConfig()).validate()
    if teacher_predictor.role != "teacher" or student_predictor.role != "student":
        raise ValueError("pass the teacher's predictor (role 'teacher') and the student's (role 'student')")
    teacher_predictor = _bind_tokenizer(teacher_predictor, teacher)
    student_predictor = _bind_tokenizer(student_predictor, student)
    check_think_markers(teacher, cfg, "teacher")
    check_think_markers(student, cfg, "student")
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
        counter = _token_counter(tok)
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
                    if f.final:
                        summary["failures"][last[0]] = summary["failures"].get(last[0], 0) + 1
                        rec = _failure_record(prob, last[0], last[1], attempt, run.models)
                        break
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
                             "extend": cfg.extend, "temperature": cfg.temperature,
                             "markers": {r: list(cfg.markers(r)) for r in ("teacher", "student")}}
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
    for r, b in (("teacher", teacher), ("student", student)):
        if hasattr(b, "prefill_tokens"):
            summary[f"{r}_prefill_tokens"] = b.prefill_tokens
            summary[f"{r}_reused_tokens"] = b.reused_tokens
    summary["student_token_share"] = summary["student_tokens"] / summary["tokens"] if summary["tokens"] else 0.0
    summary["problems_per_minute"] = 60.0 * summary["records"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    return summary


def run_synthesis(*args, **kwargs) -> dict:
    """Synchronous wrapper of :func:`synthesize` (runs its own event loop)."""
    return asyncio.run(synthesize(*args, **kwargs))
