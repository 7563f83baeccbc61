"""Synthetic task generators of the testbed: ``recall`` and ``arith``.

Both generators are pure Python and deterministic per seed. Every example carries
its prompt text, the prompt token ids (already tokenized with the testbed
tokenizer, or with the tokenizer passed in), and the expected answer.

``recall`` (long context; KV Packet, IceCache)::

    <bos><doc>\\nQK=481\\nZA=907\\n...</doc>\\n<doc>\\n...</doc>\\nQuery: ZA=   ->  907

  Keys are two upper-case letters (unique within one context), values three
  digits. Each document is a separable span ``<doc>\\n ... </doc>\\n`` (token
  spans in :attr:`RecallExample.doc_spans`); the question comes after all of them.

``arith`` (reasoning; TIP, TESSY)::

    <bos>user: Compute ((12 + 7) * 3) - 5\\nassistant:
    <think> First, 12 + 7 = 19. Then 19 * 3 = 57. Finally, 57 - 5 = 52. </think> 52<eos>

  The same reasoning in two writing styles, ``teacher`` and ``student``. Every
  completion token is labelled ``"style"`` (connectives, fillers, tone) or
  ``"capability"`` (numbers, operators, results, the think markers and the
  answer); :attr:`ArithExample.labels` is aligned with
  :attr:`ArithExample.completion_ids`.
"""
from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "RecallExample", "ArithExample", "recall", "arith", "STYLES", "STYLE", "CAPABILITY",
    "recall_records_for_context", "MAX_RECALL_RECORDS", "arith_mixed", "MIXED_PURE_TEACHER",
    "FILLER_LINE_LETTERS",
]

STYLES = ("teacher", "student")
STYLE = "style"
CAPABILITY = "capability"

KEYS = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase]
MAX_RECALL_RECORDS = len(KEYS)  # 676 unique keys per context
RECORD_TOKENS = 7               # "QK=481\n"
DOC_OVERHEAD_TOKENS = 4         # "<doc>" "\n" ... "</doc>" "\n"
PREFIX_TOKENS = 1               # "<bos>"
QUERY_TOKENS = 6                # "Query" ":" " " K K "="
VALUE_DIGITS = 3
#: a filler line (``filler_share``) is this many random upper-case letters and a newline: no ``=``
#: and no digit, so it cannot be read as a ``KEY=VVV`` record, yet every key bigram can occur in it
#: (a near miss the look-up must reject: ``MY`` in ``QMYNBIQPZ`` is not followed by ``=``). The
#: letters are tokens the recall model reads in every record; tokens it never trained on (lower-case
#: words) break its look-up whatever the context length (measurements in docs/testbed.md).
FILLER_LINE_LETTERS = 9
FILLER_TOKENS = FILLER_LINE_LETTERS + 1  # letters, "\n"


def _tokenizer(tokenizer):
    if tokenizer is None:
        from .tokenizer import get_tokenizer
        return get_tokenizer()
    return tokenizer


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_int(name, value, minimum, maximum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {rng}, got {value}")


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


# ----------------------------------------------------------------------------- recall

@dataclass
class RecallExample:
    """One ``recall`` problem.

    ``doc_spans[i] = (start, end)`` are token indices (end exclusive) into
    ``prompt_ids`` of document ``i`` including its ``<doc>``/``</doc>`` markers and
    trailing newline; ``prefix_span`` is the ``<bos>`` before them and
    ``question_span`` the query after them. ``answer_ids`` excludes ``<eos>``.
    """
    prompt: str
    prompt_ids: List[int]
    answer: str
    answer_ids: List[int]
    key: str
    target_doc: int
    doc_spans: List[Tuple[int, int]]
    prefix_span: Tuple[int, int]
    question_span: Tuple[int, int]
    documents: List[str]
    records: List[List[Tuple[str, str]]] = field(repr=False)

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids)


def recall_records_for_context(context_tokens: int, records_per_doc: int = 16) -> List[int]:
    """Records per document so that a ``recall`` prompt has about ``context_tokens``
    tokens (never more, at most 6 fewer). Returns one count per document."""
    _check_int("context_tokens", context_tokens, 32)
    _check_int("records_per_doc", records_per_doc, 1)
    budget = context_tokens - PREFIX_TOKENS - QUERY_TOKENS
    per_doc = DOC_OVERHEAD_TOKENS + RECORD_TOKENS * records_per_doc
    n_docs = max(1, budget // per_doc)
    budget -= n_docs * DOC_OVERHEAD_TOKENS
    total = budget // RECORD_TOKENS
    if total < n_docs:
        raise ValueError(f"context_tokens={context_tokens} is too short for one record per document")
    if total > MAX_RECALL_RECORDS:
        raise ValueError(
            f"context_tokens={context_tokens} needs {total} records, more than the "
            f"{MAX_RECALL_RECORDS} unique keys (max context ~{recall_max_context(records_per_doc)} tokens)")
    counts = [total // n_docs] * n_docs
    for i in range(total - sum(counts)):
        counts[i] += 1
    return counts


def recall_max_context(records_per_doc: int = 16) -> int:
    """Longest context (tokens) ``recall`` can fill with unique keys."""
    n_docs = -(-MAX_RECALL_RECORDS // records_per_doc)
    return (PREFIX_TOKENS + QUERY_TOKENS + MAX_RECALL_RECORDS * RECORD_TOKENS
            + n_docs * DOC_OVERHEAD_TOKENS)


def _check_filler_share(filler_share):
    if isinstance(filler_share, bool) or not isinstance(filler_share, (int, float)):
        raise TypeError(f"filler_share must be a float in [0, 0.9], got {type(filler_share).__name__}")
    if not 0.0 <= filler_share <= 0.9:
        raise ValueError(f"filler_share must be in [0, 0.9], got {filler_share}")


def recall_plan(context_tokens: int, records_per_doc: int = 16,
                filler_share: float = 0.0) -> Tuple[List[int], int]:
    """Records per document and number of filler lines of a ``recall`` context of about
    ``context_tokens`` tokens. ``filler_share`` is the share of the context given to filler lines
    (the records get the rest, at most the :data:`MAX_RECALL_RECORDS` unique keys: the filler then
    takes what they cannot fill). With ``filler_share=0`` this is
    ``(recall_records_for_context(...), 0)``."""
    _check_filler_share(filler_share)
    if filler_share == 0:
        return recall_records_for_context(context_tokens, records_per_doc), 0
    _check_int("context_tokens", context_tokens, 32)
    rec_ctx = min(recall_max_context(records_per_doc),
                  max(32, int(round(context_tokens * (1.0 - filler_share)))))
    counts = recall_records_for_context(rec_ctx, records_per_doc)
    used = PREFIX_TOKENS + QUERY_TOKENS + RECORD_TOKENS * sum(counts) + DOC_OVERHEAD_TOKENS * len(counts)
    return counts, max(0, (context_tokens - used) // FILLER_TOKENS)


def _filler_line(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(FILLER_LINE_LETTERS)) + "\n"


def _spread_filler(rng: random.Random, records, n_filler: int):
    """Lines of every document: its records (``(key, value)``) with ``n_filler`` filler lines
    (``str``) inserted at uniformly random places across all documents."""
    lines = [list(recs) for recs in records]
    for _ in range(n_filler):
        d = rng.randrange(len(lines))
        lines[d].insert(rng.randint(0, len(lines[d])), _filler_line(rng))
    return lines


def _recall_layout(rng: random.Random, counts: Sequence[int]):
    total = sum(counts)
    if total > MAX_RECALL_RECORDS:
        raise ValueError(f"{total} records exceed the {MAX_RECALL_RECORDS} unique keys")
    keys = rng.sample(KEYS, total)
    records, k = [], 0
    for c in counts:
        records.append([(keys[k + j], "%03d" % rng.randrange(1000)) for j in range(c)])
        k += c
    return records


def _recall_context_text(records) -> Tuple[List[str], str]:
    """Documents and context text; a line is a ``(key, value)`` record or a filler line (``str``)."""
    docs = ["<doc>\n" + "".join(x if isinstance(x, str) else f"{x[0]}={x[1]}\n" for x in recs)
            + "</doc>\n" for recs in records]
    return docs, "<bos>" + "".join(docs)


def recall(n_docs: int = 8, records_per_doc: int = 16, seed: int = 0,
           context_tokens: Optional[int] = None, tokenizer=None,
           filler_share: float = 0.0) -> RecallExample:
    """Generate one ``recall`` example.

    ``n_docs`` documents of ``records_per_doc`` key/value records each, then one
    query for a random record. With ``context_tokens`` the number of documents
    (and a few extra records) is chosen instead so that the prompt is about that
    many tokens long (``n_docs`` is then ignored).

    ``filler_share`` (with ``context_tokens``): that share of the context is filler lines of
    :data:`FILLER_LINE_LETTERS` upper-case letters (no ``=``, no digit) spread at random through the documents, the
    rest records (:func:`recall_plan`). The unique keys fill at most ~4,900 tokens; the filler
    reaches longer contexts, e.g. ``context_tokens=8192, filler_share=0.5`` (~580 records, the
    queried record anywhere in 8,192 tokens). ``0`` (default): records only.
    """
    _check_seed(seed)
    _check_int("records_per_doc", records_per_doc, 1)
    _check_filler_share(filler_share)
    n_filler = 0
    if context_tokens is not None:
        counts, n_filler = recall_plan(context_tokens, records_per_doc, filler_share)
    else:
        if filler_share:
            raise ValueError("filler_share needs context_tokens")
        _check_int("n_docs", n_docs, 1)
        if n_docs * records_per_doc > MAX_RECALL_RECORDS:
            raise ValueError(
                f"n_docs * records_per_doc = {n_docs * records_per_doc} exceeds the "
                f"{MAX_RECALL_RECORDS} unique keys")
        counts = [records_per_doc] * n_docs
    tok = _tokenizer(tokenizer)
    rng = random.Random(f"recall:{seed}")
    records = _recall_layout(rng, counts)
    target_doc = rng.randrange(len(records))
    key, value = rng.choice(records[target_doc])
    lines = _spread_filler(rng, records, n_filler) if n_filler else records
    docs, context = _recall_context_text(lines)
    question = f"Query: {key}="
    prompt = context + question

    ids = _encode(tok, "<bos>")
    prefix_span = (0, len(ids))
    spans = []
    for d in docs:
        start = len(ids)
        ids += _encode(tok, d)
        spans.append((start, len(ids)))
    q_start = len(ids)
    ids += _encode(tok, question)
    return RecallExample(
        prompt=prompt, prompt_ids=ids, answer=value, answer_ids=_encode(tok, value),
        key=key, target_doc=target_doc, doc_spans=spans, prefix_span=prefix_span,
        question_span=(q_start, len(ids)), documents=docs, records=records)


def recall_training_text(rng: random.Random, context_tokens: int, n_queries: int,
                         records_per_doc: int = 16,
                         confusable_keys: bool = False,
                         shared_value_prefixes: bool = False,
                         filler_share: float = 0.0) -> Tuple[str, List[Tuple[int, int]]]:
    """A training sequence: a recall context followed by ``n_queries`` answered
    queries ``Query: K=VVV<eos>\\n``. Returns the text and the character spans of
    every answer (value digits plus ``<eos>``), on which the loss is taken.

    ``confusable_keys``: the keys are drawn from a random alphabet of only ``a`` letters, the
    smallest with ``a * a >= 1.2 * records`` (at least 3), so most keys share a letter with many
    others and reversed pairs (``KE`` / ``EK``) occur even in short contexts. The look-up then has to
    match both letters in order; the typical error of a model trained without it at 2,048 tokens is
    the value of a record whose key shares one letter with the queried key (``XS`` -> ``SS``'s value).

    ``shared_value_prefixes``: the values' first two digits come from a random set of about one
    prefix per 8 records, so every ``d1 d2`` occurs in ~8 records and the third digit can only be
    copied from the queried key's record. Without it a 2-digit prefix occurs in ~3 records at
    2,048 tokens, and the typical error of the model is a right record's first two digits followed by
    another record's third digit (``869`` -> ``862``, the value of a record that also starts ``86``).

    ``filler_share``: that share of the context is filler lines spread through the documents, as in
    :func:`recall` (``recall_plan``).
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    _check_int("n_queries", n_queries, 1)
    for name, flag in (("confusable_keys", confusable_keys), ("shared_value_prefixes", shared_value_prefixes)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    _check_filler_share(filler_share)
    counts, n_filler = recall_plan(context_tokens - (n_queries - 1) * 12, records_per_doc, filler_share)
    if confusable_keys:
        total = sum(counts)
        a = max(3, math.ceil(math.sqrt(1.2 * total)))
        letters = rng.sample(string.ascii_uppercase, min(a, 26))
        keys = rng.sample([x + y for x in letters for y in letters], total)
        records, k = [], 0
        for c in counts:
            records.append([(keys[k + j], "%03d" % rng.randrange(1000)) for j in range(c)])
            k += c
    else:
        records = _recall_layout(rng, counts)
    if shared_value_prefixes:
        total = sum(counts)
        prefixes = rng.sample(range(100), max(2, min(100, math.ceil(total / 8))))
        records = [[(k, "%02d%d" % (rng.choice(prefixes), rng.randrange(10))) for k, _ in recs]
                   for recs in records]
    _, text = _recall_context_text(_spread_filler(rng, records, n_filler) if n_filler else records)
    flat = [kv for recs in records for kv in recs]
    spans = []
    # Distinct keys: a repeated query could be answered by copying the earlier answer instead of
    # looking the key up in the documents (a shortcut that lowers the loss without learning recall).
    for q, (k, v) in enumerate(rng.sample(flat, min(n_queries, len(flat)))):
        if q:
            text += "\n"
        text += f"Query: {k}="
        spans.append((len(text), len(text) + len(v) + len("<eos>")))
        text += v + "<eos>"
    return text, spans


# ----------------------------------------------------------------------------- arith

@dataclass
class ArithExample:
    """One ``arith`` problem written in one style.

    ``completion`` is the assistant turn ``<think> ... </think> ANSWER`` (without
    ``<eos>``); ``completion_ids`` its tokens and ``labels`` one of ``"style"`` /
    ``"capability"`` per completion token. ``segments`` are the labelled text pieces
    the completion was built from. ``steps`` are ``(a, op, b, result)`` tuples.
    """
    problem: str
    prompt: str
    prompt_ids: List[int]
    completion: str
    completion_ids: List[int]
    labels: List[str]
    answer: str
    answer_ids: List[int]
    style: str
    steps: List[Tuple[int, str, int, int]]
    segments: List[Tuple[str, str]] = field(repr=False)

    @property
    def label_ids(self) -> List[int]:
        """Labels as ints: 1 = style, 0 = capability."""
        return [1 if lab == STYLE else 0 for lab in self.labels]


_OP_WORD = {"+": "plus", "-": "minus", "*": "times"}
MAX_VALUE = 99


def _arith_steps(rng: random.Random, n_steps: int):
    cur = rng.randint(2, 20)
    steps = []
    for _ in range(n_steps):
        ops = []
        if cur < MAX_VALUE:
            ops.append("+")
        if cur >= 1:
            ops.append("-")
        if 2 <= cur <= MAX_VALUE // 2:
            ops.append("*")
        op = rng.choice(ops)
        if op == "+":
            b = rng.randint(1, min(12, MAX_VALUE - cur))
        elif op == "-":
            b = rng.randint(1, min(12, cur))
        else:
            b = rng.randint(2, min(9, MAX_VALUE // cur))
        r = cur + b if op == "+" else cur - b if op == "-" else cur * b
        steps.append((cur, op, b, r))
        cur = r
    return steps


def _problem_text(steps) -> str:
    expr = str(steps[0][0])
    for i, (_, op, b, _) in enumerate(steps):
        expr = f"{expr} {op} {b}"
        if i < len(steps) - 1:
            expr = f"({expr})"
    return expr


def _teacher_block(rng, i, n, step):
    """Style + capability segments of reasoning step ``i`` of ``n`` in the teacher style."""
    a, op, b, r = step
    if i == 0:
        conn = rng.choice(["First, ", "First, "])
    elif i == n - 1:
        conn = rng.choice(["Finally, ", "Finally, "])
    else:
        conn = rng.choice(["Then ", "Next, "])
    return [(" " + conn, STYLE), (f"{a} {op} {b} = {r}.", CAPABILITY)]


def _student_block(rng, i, n, step):
    """Style + capability segments of reasoning step ``i`` of ``n`` in the student style (the
    first step restates the operation in words)."""
    a, op, b, r = step
    segs = []
    if i == 0:
        segs.append((" " + rng.choice(["Okay so ", "Okay, let me see, ", "Alright so "]), STYLE))
        segs.append((f"{a} {_OP_WORD[op]} {b}", CAPABILITY))
        segs.append(("... " + rng.choice(["hmm, ", "um, ", "so "]), STYLE))
    else:
        segs.append((" " + rng.choice(["Wait, next ", "Hmm, then ", "Um, now ", "Okay and "]), STYLE))
    segs.append((f"{a} {op} {b} = {r}.", CAPABILITY))
    return segs


def _teacher_end(rng, steps):
    return [(" ", STYLE), ("</think> " + str(steps[-1][3]), CAPABILITY)]


def _student_end(rng, steps):
    return [(" " + rng.choice(["Done.", "Yeah.", "Right."]) + " ", STYLE),
            ("</think> " + str(steps[-1][3]), CAPABILITY)]


def _teacher_segments(rng, steps):
    segs = [("<think>", CAPABILITY)]
    for i, step in enumerate(steps):
        segs += _teacher_block(rng, i, len(steps), step)
    return segs + _teacher_end(rng, steps)


def _student_segments(rng, steps):
    segs = [("<think>", CAPABILITY)]
    for i, step in enumerate(steps):
        segs += _student_block(rng, i, len(steps), step)
    return segs + _student_end(rng, steps)


#: share of ``arith_mixed`` traces written entirely in the teacher style when ``student_share`` is
#: not given; the others draw their student share uniformly from [0, 1]. Teacher-style openings
#: then make up 0.4 + 0.6 / 2 = 70% of the traces, so a model trained on them opens (greedy) in
#: the teacher style.
MIXED_PURE_TEACHER = 0.4


def arith_mixed(seed: int = 0, student_share: Optional[float] = None, n_steps: Optional[int] = None,
                tokenizer=None) -> ArithExample:
    """One ``arith`` problem (the same problem and steps as ``arith(seed)``) written in a mixture of
    the two styles: every reasoning step, and the closing phrase, is written in the student style
    with probability ``student_share``, otherwise in the teacher style; the capability segments are
    always the correct ones. ``student_share=None`` draws it per example: 0 (a pure teacher-style
    trace) with probability ``MIXED_PURE_TEACHER``, else uniform in [0, 1]. ``style`` is
    ``"mixed"``. The training data of ``arith-teacher-robust``."""
    _check_seed(seed)
    if student_share is not None:
        if isinstance(student_share, bool) or not isinstance(student_share, (int, float)):
            raise TypeError(f"student_share must be a float in [0, 1] or None, got {type(student_share).__name__}")
        if not 0.0 <= student_share <= 1.0:
            raise ValueError(f"student_share must be in [0, 1], got {student_share}")
    rng = random.Random(f"arith:{seed}")
    if n_steps is None:
        n_steps = rng.randint(2, 4)
    _check_int("n_steps", n_steps, 1, 8)
    steps = _arith_steps(rng, n_steps)
    srng = random.Random(f"arith-style:mixed:{seed}")
    q = student_share
    if q is None:
        q = 0.0 if srng.random() < MIXED_PURE_TEACHER else srng.random()
    segs = [("<think>", CAPABILITY)]
    for i, step in enumerate(steps):
        block = _student_block if srng.random() < q else _teacher_block
        segs += block(srng, i, len(steps), step)
    segs += (_student_end if srng.random() < q else _teacher_end)(srng, steps)
    return _arith_build(_tokenizer(tokenizer), steps, segs, "mixed")


def arith(seed: int = 0, style: str = "teacher", n_steps: Optional[int] = None,
          tokenizer=None) -> ArithExample:
    """Generate one ``arith`` example: a chain of ``n_steps`` (default: 2-4 at
    random) additions/subtractions/multiplications of small numbers, evaluated left
    to right with every intermediate value in [0, 99], written in ``style``."""
    _check_seed(seed)
    if not isinstance(style, str):
        raise TypeError(f"style must be a str, got {type(style).__name__}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid styles: {', '.join(STYLES)}")
    rng = random.Random(f"arith:{seed}")
    if n_steps is None:
        n_steps = rng.randint(2, 4)
    _check_int("n_steps", n_steps, 1, 8)
    steps = _arith_steps(rng, n_steps)
    srng = random.Random(f"arith-style:{style}:{seed}")
    segs = (_teacher_segments if style == "teacher" else _student_segments)(srng, steps)
    return _arith_build(_tokenizer(tokenizer), steps, segs, style)


def _arith_build(tok, steps, segs, style) -> ArithExample:
    problem = "Compute " + _problem_text(steps)
    prompt = f"<bos>user: {problem}\nassistant: "
    completion = "".join(t for t, _ in segs)
    enc = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    # label of every character, then of every token (all chars of a token share one label)
    char_lab = []
    for text, lab in segs:
        char_lab += [lab] * len(text)
    labels = []
    for (s, e) in enc["offset_mapping"]:
        labs = set(char_lab[s:e])
        if len(labs) != 1:  # a token straddling two segments: generator bug
            raise AssertionError(f"token {completion[s:e]!r} straddles style/capability segments")
        labels.append(labs.pop())
    answer = str(steps[-1][3])
    return ArithExample(
        problem=problem, prompt=prompt, prompt_ids=_encode(tok, prompt), completion=completion,
        completion_ids=ids, labels=labels, answer=answer, answer_ids=_encode(tok, answer),
        style=style, steps=steps, segments=segs)
