"""Boundary predictors: where a model's span should end.

TESSY runs two small token classifiers over the shared trace:

* ``B_T`` reads the *teacher's* text and fires at the first token predicted
  *style* (the student should write it);
* ``B_S`` reads the *student's* text and fires at the first token predicted
  *capability* (the teacher should write it).

Labels are shifted left by one: the prediction at position ``i`` is the class of
token ``i + 1``. A cut after token ``i`` therefore ends the span *before* the
token the other model should write. Class ids: ``1 = style``, ``0 = capability``.

Three implementations share :class:`Predictor` (``predict`` + the cut rule):

* :class:`BoundaryPredictor` - a Hugging Face causal model with a
  token-classification head (``Qwen3ForTokenClassification`` by default),
  trained with :func:`train_predictor` from labelled style spans;
* :class:`LexiconPredictor` - the no-training fallback: a phrase lexicon labels
  the generated tokens, the cut falls before the first lexicon match (teacher) or
  the first non-lexicon token (student); tokens are those of the tokenizer it is
  given (in synthesis: its model's), else words, punctuation and whitespace runs;
* anything else implementing ``predict(texts) -> [(offsets, next_labels)]``.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

STYLE = 1
CAPABILITY = 0
ROLES = ("teacher", "student")
EXTEND_MODES = ("word", "code", "none")

__all__ = [
    "STYLE", "CAPABILITY", "ROLES", "Cut", "Predictor", "BoundaryPredictor", "LexiconPredictor",
    "spans_to_token_labels", "cut_generated", "train_predictor", "evaluate_predictor",
    "load_predictor", "DEFAULT_LEXICON", "WordTokenizer",
]


def _check_role(role):
    if role not in ROLES:
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    return role


def boundary_class(role: str) -> int:
    """The predicted class that ends a span of ``role``: style for the teacher,
    capability for the student."""
    return STYLE if _check_role(role) == "teacher" else CAPABILITY


@dataclass
class Cut:
    """Result of cutting one generated span.

    ``text``: the part of the generated text that is kept; ``boundary``: a
    boundary was found (the roles switch); ``boundary_char``: offset in the
    generated text where the predictor cut, before the whitespace extension
    (``-1`` without a boundary)."""
    text: str
    boundary: bool
    boundary_char: int = -1


def spans_to_token_labels(offsets: Sequence[Tuple[int, int]], spans: Iterable[Tuple[int, int]]) -> List[int]:
    """Per-token labels (1 = style) from character spans of style text.

    A token is style when its first character lies in a span, or a span starts
    inside the token (the rule of the official predictor trainer)."""
    spans = sorted((int(s), int(e)) for s, e in spans if e > s)
    labels = []
    for (ts, te) in offsets:
        lab = CAPABILITY
        for (s, e) in spans:
            if s <= ts < e or (ts <= s < te):
                lab = STYLE
                break
            if s > te:
                break
        labels.append(lab)
    return labels


def _extend(combined: str, cut: int, start: int, mode: str) -> int:
    """Move ``cut`` (an index into ``combined``) forward so that no word is split.

    ``word`` (default, the paper's rule): when the cut falls inside a word (non-space
    characters on both sides), extend to the next whitespace. ``code``: as the official
    code, extend while the next character is not whitespace (also when the cut is right
    after a space). ``none``: no extension."""
    n = len(combined)
    if mode == "none" or cut >= n:
        return cut
    if mode == "word" and (cut <= start or combined[cut - 1].isspace()):
        return cut
    while cut < n and not combined[cut].isspace():
        cut += 1
    return cut


def cut_generated(context: str, generated: str, offsets: Sequence[Tuple[int, int]],
                  next_labels: Sequence[int], role: str, extend: str = "word",
                  min_span_tokens: int = 1) -> Cut:
    """Apply the TESSY cut rule to one generated span.

    ``offsets``/``next_labels`` cover the tokens of ``context + generated`` (the
    classifier's view, possibly left-truncated); ``next_labels[i]`` is the predicted
    class of token ``i + 1``. The first generated token ``i`` (counting from
    ``min_span_tokens - 1``) whose prediction is the role's boundary class ends the
    span after token ``i`` (that token is kept), then the cut is extended to the next
    whitespace (see :func:`_extend`)."""
    if extend not in EXTEND_MODES:
        raise ValueError(f"extend must be one of {EXTEND_MODES}, got {extend!r}")
    target = boundary_class(role)
    start = len(context)
    combined = context + generated
    k = 0
    for (ts, te), lab in zip(offsets, next_labels):
        if te <= start or te <= ts:
            continue  # a context token (or an empty special token)
        k += 1
        if k < min_span_tokens:
            continue
        if lab == target:
            cut = _extend(combined, te, start, extend)
            return Cut(text=combined[start:cut], boundary=True, boundary_char=te - start)
    return Cut(text=generated, boundary=False)


class Predictor:
    """Base class: subclasses implement :meth:`predict`."""

    role: str = "teacher"
    name: str = "predictor"

    def predict(self, texts: Sequence[str]) -> List[Tuple[List[Tuple[int, int]], List[int]]]:
        """For every text: the token offsets and the predicted class of each token's
        *next* token (1 = style)."""
        raise NotImplementedError

    def cut_batch(self, contexts: Sequence[str], generated: Sequence[str], extend: str = "word",
                  min_span_tokens: int = 1) -> List[Cut]:
        """Cut every ``generated[j]`` (continuing ``contexts[j]``) at the first boundary."""
        if len(contexts) != len(generated):
            raise ValueError("contexts and generated must have the same length")
        preds = self.predict([c + g for c, g in zip(contexts, generated)])
        return [cut_generated(c, g, off, lab, self.role, extend, min_span_tokens)
                for c, g, (off, lab) in zip(contexts, generated, preds)]

    def describe(self) -> str:
        return f"{self.name}({self.role})"


# ----------------------------------------------------------------------------- lexicon

#: style phrases of the fallback predictor: connectives, fillers, tone (English + testbed)
DEFAULT_LEXICON = (
    "okay so", "okay and", "okay", "ok", "alright so", "alright", "so", "well", "hmm", "um", "uh", "wait",
    "let me see", "let me think", "let's see", "let me", "i think", "first", "firstly", "then",
    "next", "now", "finally", "after that", "and then", "but", "however", "actually",
    "right", "yeah", "done", "good", "oh", "in this case", "to begin with", "for example",
    "so we get", "we get", "check again", "let me check", "again",
)


class WordTokenizer:
    """A tokenizer-shaped splitter into words, single punctuation characters and whitespace runs
    (``tok(text, return_offsets_mapping=True)`` -> ``input_ids`` (positions) and ``offset_mapping``):
    what a :class:`LexiconPredictor` without a model tokenizer labels."""

    _RE = re.compile(r"\w+|[^\w\s]|\s+")

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        offs = [(m.start(), m.end()) for m in self._RE.finditer(text)]
        out = {"input_ids": list(range(len(offs)))}
        if return_offsets_mapping:
            out["offset_mapping"] = offs
        return out


class LexiconPredictor(Predictor):
    """No-training fallback: a token is *style* when it lies in a lexicon match.

    A match is a lexicon phrase (case-insensitive, whole words) together with the
    punctuation right after it (``,`` ``.`` ``!`` ``?`` ``:``), an ellipsis right
    before it, and the whitespace around it. The labels of the actual tokens are
    shifted left by one (the last token's next class is unknown: no boundary).

    ``tokenizer``: whose tokens are labelled (a fast Hugging Face tokenizer, for offsets).
    ``None``: :func:`~scrimp.tessy.synthesize` binds the tokenizer of the model whose text the
    predictor reads; used alone it labels :class:`WordTokenizer` pieces."""

    def __init__(self, role: str = "teacher", phrases: Sequence[str] = DEFAULT_LEXICON, tokenizer=None):
        self.role = _check_role(role)
        self.phrases = tuple(sorted({p.lower() for p in phrases}, key=len, reverse=True))
        if not self.phrases:
            raise ValueError("the lexicon is empty")
        alt = "|".join(r"\s+".join(re.escape(w) for w in p.split()) for p in self.phrases)
        self._re = re.compile(r"\s*(?:\.\.\.\s*)?\b(?:" + alt + r")\b[,.!?:]*\s*", re.IGNORECASE)
        self.tokenizer = tokenizer
        self.name = "lexicon"

    @property
    def text_tokenizer(self):
        """The tokenizer whose tokens are labelled."""
        return self.tokenizer if self.tokenizer is not None else WordTokenizer()

    def with_tokenizer(self, tokenizer) -> "LexiconPredictor":
        """A copy that labels the tokens of ``tokenizer``."""
        import copy
        other = copy.copy(self)
        other.tokenizer = tokenizer
        return other

    def style_spans(self, text: str) -> List[Tuple[int, int]]:
        return [(m.start(), m.end()) for m in self._re.finditer(text) if m.end() > m.start()]

    def predict(self, texts):
        out = []
        tok = self.text_tokenizer
        for t in texts:
            enc = tok(t, add_special_tokens=False, return_offsets_mapping=True)
            offs = [tuple(o) for o in enc["offset_mapping"]]
            spans = self.style_spans(t)
            # a token is style only if it lies wholly inside a match
            labs = []
            for (ts, te) in offs:
                labs.append(STYLE if any(s <= ts and te <= e for s, e in spans) else CAPABILITY)
            unknown = 1 - boundary_class(self.role)
            out.append((offs, labs[1:] + [unknown]))
        return out

    def describe(self) -> str:
        return f"lexicon({self.role}, {len(self.phrases)} phrases)"


# ----------------------------------------------------------------------------- HF classifier

_META = "tessy_predictor.json"


class BoundaryPredictor(Predictor):
    """A Hugging Face causal token classifier (2 labels) used as a boundary predictor.

    ``predict`` reads the last ``max_length`` tokens of each text (the official code
    lets the classifier see the last 200 tokens) and returns the argmax class of each
    position, i.e. the predicted class of the *next* token."""

    def __init__(self, model, tokenizer, role: str = "teacher", max_length: int = 200,
                 batch_size: int = 64, name: Optional[str] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.role = _check_role(role)
        if max_length < 2:
            raise ValueError("max_length must be >= 2")
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.name = name or "classifier"
        n_labels = getattr(model.config, "num_labels", None)
        if n_labels != 2:
            raise ValueError(f"a boundary predictor needs a 2-label token classifier, got num_labels={n_labels}")
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ValueError(f"tokenizer mismatch: the tokenizer has {len(tokenizer)} tokens but the "
                             f"classifier's embedding has {vocab}")

    # -- construction
    @classmethod
    def new(cls, role: str = "teacher", tokenizer=None, hidden: int = 64, layers: int = 2, heads: int = 4,
            kv_heads: int = 2, intermediate: Optional[int] = None, max_length: int = 200,
            init_from: Optional[str] = None, seed: int = 0, device=None):
        """A fresh classifier: a small ``Qwen3ForTokenClassification`` over ``tokenizer``'s
        vocabulary, or initialised from the causal LM ``init_from`` (a spec for
        :func:`scrimp.models.resolve_model_spec`: its backbone is kept, a new 2-label head is added;
        ``tokenizer`` defaults to its own). ``device``: where it runs (default: the CPU)."""
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer
        torch.manual_seed(seed)
        if init_from is not None:
            from scrimp.models import resolve_model_spec
            where = resolve_model_spec(init_from)
            model = AutoModelForTokenClassification.from_pretrained(where, num_labels=2)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(where)
        else:
            if tokenizer is None:
                raise ValueError("BoundaryPredictor.new needs tokenizer= (the tokenizer of the text it will read) "
                                 "or init_from= (a causal LM checkpoint with its tokenizer)")
            from transformers import Qwen3Config, Qwen3ForTokenClassification
            cfg = Qwen3Config(
                vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 3 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=hidden // heads, max_position_embeddings=max(512, max_length + 8),
                num_labels=2, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                classifier_dropout=0.0)
            model = Qwen3ForTokenClassification(cfg)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        pred = cls(model, tokenizer, role=role, max_length=max_length)
        return pred.to(device) if device is not None else pred

    @classmethod
    def from_pretrained(cls, path: str, role: Optional[str] = None, max_length: Optional[int] = None,
                        device=None, dtype=None):
        from transformers import AutoModelForTokenClassification, AutoTokenizer
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no boundary predictor directory at {path!r}")
        meta = {}
        mp = os.path.join(path, _META)
        if os.path.isfile(mp):
            with open(mp) as f:
                meta = json.load(f)
        model = AutoModelForTokenClassification.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        role = role or meta.get("role")
        if role is None:
            raise ValueError(f"{path}: no {_META} with the predictor's role; pass role=")
        pred = cls(model, tok, role=role, max_length=max_length or meta.get("max_length", 200),
                   name=os.path.basename(os.path.normpath(path)))
        return pred.to(device, dtype) if device is not None or dtype is not None else pred

    def to(self, device=None, dtype=None) -> "BoundaryPredictor":
        """Move the classifier to ``device`` (``auto``: CUDA when available) and/or ``dtype``."""
        from scrimp.models import resolve_device, resolve_dtype
        if device is not None:
            self.model = self.model.to(resolve_device(device))
        dt = resolve_dtype(dtype)
        if dt is not None:
            self.model = self.model.to(dt)
        return self

    @property
    def device(self):
        return next(self.model.parameters()).device

    def save_pretrained(self, path: str, extra: Optional[dict] = None) -> None:
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        meta = {"role": self.role, "max_length": self.max_length, "label_ids": {"style": STYLE, "capability": CAPABILITY}}
        meta.update(extra or {})
        with open(os.path.join(path, _META), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    # -- inference
    def _encode(self, texts):
        encs = []
        for t in texts:
            enc = self.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            offs = [tuple(o) for o in enc["offset_mapping"]]
            if len(ids) > self.max_length:  # left truncation: keep the end of the trace
                ids, offs = ids[-self.max_length:], offs[-self.max_length:]
            encs.append((ids, offs))
        return encs

    def logits(self, encs):
        """Per-position logits ``[B, L, 2]`` (right padding; the model is causal)."""
        import torch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        n = max(1, max(len(i) for i, _ in encs))
        inp = torch.full((len(encs), n), pad, dtype=torch.long)
        att = torch.zeros((len(encs), n), dtype=torch.long)
        for b, (ids, _) in enumerate(encs):
            if ids:
                inp[b, :len(ids)] = torch.tensor(ids)
                att[b, :len(ids)] = 1
        dev = next(self.model.parameters()).device
        with torch.no_grad():
            return self.model(input_ids=inp.to(dev), attention_mask=att.to(dev)).logits.float().cpu()

    def predict(self, texts):
        out = []
        encs = self._encode(texts)
        for i in range(0, len(encs), self.batch_size):
            chunk = encs[i:i + self.batch_size]
            lg = self.logits(chunk)
            pred = lg.argmax(-1)
            for b, (ids, offs) in enumerate(chunk):
                out.append((offs, pred[b, :len(ids)].tolist()))
        return out

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"classifier({self.role}, {self.name}, {n / 1e6:.2f}M params, last {self.max_length} tokens)"


def load_predictor(spec: str, role: str, tokenizer=None, device=None) -> Predictor:
    """``"lexicon"`` (over ``tokenizer``; ``None``: bound to its model's in synthesis) or a directory
    saved by :meth:`BoundaryPredictor.save_pretrained` (moved to ``device``)."""
    if spec == "lexicon":
        return LexiconPredictor(role, tokenizer=tokenizer)
    p = BoundaryPredictor.from_pretrained(spec, device=device)
    if p.role != role:
        raise ValueError(f"predictor {spec!r} was trained for the {p.role}'s text, not the {role}'s")
    return p


# ----------------------------------------------------------------------------- data

def _encode_example(tokenizer, ex, max_length):
    enc = tokenizer(ex["text"], add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = spans_to_token_labels([tuple(o) for o in enc["offset_mapping"]], ex.get("spans", []))
    shifted = labels[1:] + [-100]  # position i predicts token i+1
    if len(ids) > max_length:
        ids, shifted = ids[:max_length], shifted[:max_length]
    return ids, shifted


def _crop(ex, rng, min_words=3):
    """A random suffix of the text starting at a word boundary (so the classifier
    also learns from traces whose start it does not see)."""
    text = ex["text"]
    starts = [m.start() for m in re.finditer(r"(?<=\s)\S", text)]
    if len(starts) <= min_words:
        return ex
    s = rng.choice(starts[: len(starts) - min_words])
    spans = [(max(a, s) - s, b - s) for a, b in ex.get("spans", []) if b > s]
    return {"text": text[s:], "spans": spans}


def train_predictor(predictor: BoundaryPredictor, examples: Sequence[dict], epochs: float = 3.0,
                    batch_size: int = 32, lr: float = 1e-3, max_length: int = 512, seed: int = 0,
                    crop_prob: float = 0.3, threads: Optional[int] = None, progress: bool = False,
                    max_steps: Optional[int] = None, log=None, device=None) -> dict:
    """Train ``predictor`` on ``examples`` (``{"text", "spans"}``: style char spans),
    labels shifted left by one, AdamW, cross-entropy, on the predictor's device (``device``
    moves it first). Paper: lr 1e-5 for a pretrained Qwen3-0.6B-Base, 3 epochs, batch 32, max
    length 512; a small randomly initialised classifier needs a larger rate (default 1e-3).
    Returns training metrics."""
    import torch
    if not examples:
        raise ValueError("no training examples")
    bad = next((i for i, ex in enumerate(examples) if not isinstance(ex, dict) or not isinstance(ex.get("text"), str)
                or not isinstance(ex.get("spans", []), (list, tuple))), None)
    if bad is not None:
        raise ValueError(f"training example {bad}: expected {{\"text\": str, \"spans\": [[start, end], ...]}}")
    if device is not None:
        predictor.to(device)
    if threads:
        torch.set_num_threads(threads)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = predictor.tokenizer
    model = predictor.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps_per_epoch = max(1, math.ceil(len(examples) / batch_size))
    total = max_steps or max(1, int(round(epochs * steps_per_epoch)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order: List[int] = []
    t0 = time.time()
    ema = None
    it = range(total)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"train predictor ({predictor.role})", mininterval=5.0)
    for step in it:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            ex = examples[order.pop()]
            if crop_prob and rng.random() < crop_prob:
                ex = _crop(ex, rng)
            batch.append(_encode_example(tok, ex, max_length))
        n = max(len(i) for i, _ in batch)
        inp = torch.full((len(batch), n), pad, dtype=torch.long)
        att = torch.zeros((len(batch), n), dtype=torch.long)
        lab = torch.full((len(batch), n), -100, dtype=torch.long)
        for b, (ids, labels) in enumerate(batch):
            inp[b, :len(ids)] = torch.tensor(ids)
            att[b, :len(ids)] = 1
            lab[b, :len(ids)] = torch.tensor(labels)
        # lr: short warmup then cosine
        warm = max(1, total // 20)
        f = (step + 1) / warm if step < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        dev = predictor.device
        loss = model(input_ids=inp.to(dev), attention_mask=att.to(dev), labels=lab.to(dev)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if log is not None and (step + 1) % max(1, total // 10) == 0:
            log(f"step {step + 1}/{total} loss {ema:.4f}")
    model.eval()
    return {"steps": total, "final_loss": ema, "train_seconds": time.time() - t0,
            "examples": len(examples), "lr": lr, "batch_size": batch_size}


def evaluate_predictor(predictor: Predictor, examples: Sequence[dict], tokenizer=None) -> dict:
    """Token-level precision/recall of the predictor's *boundary class* (style for
    the teacher's predictor, capability for the student's) on labelled examples,
    with shifted labels (position i vs. the true class of token i+1); plus accuracy
    and the first-boundary agreement (the cut position equals the true first one)."""
    tok = tokenizer or getattr(predictor, "text_tokenizer", None) or predictor.tokenizer
    target = boundary_class(predictor.role)
    tp = fp = fn = correct = total = 0
    first_ok = first_n = 0
    preds = predictor.predict([ex["text"] for ex in examples])
    for ex, (offs, plabs) in zip(examples, preds):
        enc = tok(ex["text"], add_special_tokens=False, return_offsets_mapping=True)
        toffs = [tuple(o) for o in enc["offset_mapping"]]
        truth = spans_to_token_labels(toffs, ex.get("spans", []))
        tnext = {toffs[i]: truth[i + 1] for i in range(len(toffs) - 1)}
        pmap = dict(zip([tuple(o) for o in offs], plabs))
        for o, t in tnext.items():
            if o not in pmap:
                continue
            p = pmap[o]
            total += 1
            correct += int(p == t)
            tp += int(p == target and t == target)
            fp += int(p == target and t != target)
            fn += int(p != target and t == target)
        # first boundary after each true switch point: compare where the cut would fall
        keys = [o for o in toffs[:-1] if o in pmap]
        tfirst = next((o for o in keys if tnext[o] == target), None)
        pfirst = next((o for o in keys if pmap[o] == target), None)
        first_n += 1
        first_ok += int(tfirst == pfirst)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"role": predictor.role, "predictor": predictor.describe(), "examples": len(examples),
            "tokens": total, "boundary_class": "style" if target == STYLE else "capability",
            "precision": prec, "recall": rec, "f1": f1, "accuracy": correct / total if total else 0.0,
            "first_boundary_agreement": first_ok / first_n if first_n else 0.0}

