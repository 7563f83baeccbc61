"""IceCache evaluation on prompt/answer data: accuracy and device KV memory of the full cache vs IceCache
at several budgets (the library side of ``scrimp icecache eval``), and a ``generate_fn`` per method for
harnesses that call ``generate_fn(model, tokenizer, prompt_ids, max_new_tokens)``.

Data: a JSONL file, one object per line, ``{"prompt": str, "answer": str}`` (blank lines ignored).
Scoring rule (:func:`answer_matches`): greedy generation of ``max_new_tokens`` tokens (default: the
answer's token count + 1), cut at the first EOS, decoded without special tokens and stripped of
surrounding whitespace; correct when it starts with the stripped answer and the answer is not
followed by a letter or digit (``"042"`` matches ``"042."`` and ``"042 is"``, not ``"0421"``).
"""
from __future__ import annotations

import time
from typing import Iterable, List, Optional, Sequence

import torch

from ..jsonl import read_jsonl
from .cache import IceCache, cache_argument


def make_generate_fn(method="icecache", budget=256, record=None, **kwargs):
    """A ``generate_fn(model, tokenizer, prompt_ids, max_new_tokens)`` using a fresh IceCache per call
    (greedy; the cache passed the way the installed transformers wants it).

    ``record`` (a list) receives each call's ``cache.stats()`` plus the prompt length and seconds.
    """

    def generate_fn(model, tokenizer, prompt_ids, max_new_tokens):
        cache = IceCache(model.config, budget=budget, method=method, **kwargs)
        extra = {"prefill_chunk_size": cache.prefill_chunk} if cache.prefill_chunk else {}
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 **{cache_argument(model): cache}, **extra)
        dt = time.perf_counter() - t0
        new = out[0, prompt_ids.shape[1]:]
        if record is not None:
            s = cache.stats()
            s.update(prompt_tokens=int(prompt_ids.shape[1]), seconds=dt, new_tokens=int(new.numel()))
            record.append(s)
        return new

    return generate_fn


def load_jsonl(path: str) -> List[dict]:
    """The examples of a ``{"prompt": str, "answer": str}`` JSONL file.

    Every line is checked before anything runs: bad lines raise one ValueError listing each as
    ``PATH:N: <reason>; expected ...`` (nothing is skipped). Blank lines are ignored.
    """
    return read_jsonl(path, _check_example, EXAMPLE_FORMAT)


EXAMPLE_FORMAT = 'a JSON object {"prompt": non-empty string, "answer": non-empty string}'


def _check_example(obj: dict, line: int) -> dict:
    for key in ("prompt", "answer"):
        v = obj.get(key)
        if not isinstance(v, str) or not v.strip():
            got = "missing" if key not in obj else f"{type(v).__name__} {v!r:.40}"
            raise ValueError(f"'{key}' is {got}")
    return {"prompt": obj["prompt"], "answer": obj["answer"]}


def answer_matches(output: str, answer: str) -> bool:
    """The scoring rule (module docstring): stripped output starts with the stripped answer, which is
    not followed by a letter or digit."""
    out, ans = output.strip(), answer.strip()
    return out.startswith(ans) and not (len(out) > len(ans) and out[len(ans)].isalnum())


def _prompt_ids(tokenizer, example) -> List[int]:
    p = example["prompt"]
    if isinstance(p, str):
        return tokenizer(p).input_ids
    if isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
        return list(p)
    raise TypeError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")


def _cut_at_eos(ids: Sequence[int], eos) -> List[int]:
    ids = [int(i) for i in ids]
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def evaluate(model, tokenizer, examples: Iterable[dict], budgets: Sequence[int] = (64, 256),
             max_new_tokens: Optional[int] = None, progress: bool = True, **cache_kwargs) -> dict:
    """Greedy accuracy and device KV memory of the full cache and of IceCache at each budget.

    ``examples``: dicts with ``"prompt"`` (a string, tokenized with ``tokenizer``, or token ids) and
    ``"answer"`` (a string). ``cache_kwargs`` go to every ``IceCache`` (page geometry, dense_layers,
    prefill_chunk, ...). Returns ``{"rows": [{"method", "budget", "accuracy", "correct", "n",
    "same_as_full", "device_kv_bytes_mean", "device_kv_bytes_max", "memory_vs_full"}], "results": {...}}``;
    the full row is first, its memory is the KV of every layer (a DynamicCache's).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to evaluate")
    for b in budgets:
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"budgets must be positive ints, got {b!r}")
    device = next(model.parameters()).device
    prompts = [torch.tensor([_prompt_ids(tokenizer, ex)], dtype=torch.long, device=device) for ex in examples]
    lengths = [max_new_tokens or len(tokenizer(ex["answer"], add_special_tokens=False).input_ids) + 1
               for ex in examples]
    full = dict(method="full", budget=max(budgets, default=256), summaries=False, summary_mass=None, rerank=0)
    variants = [("full", None, full)] + [("icecache", b, dict(budget=b)) for b in budgets]
    rows, outputs = [], {}
    for name, budget, kw in variants:
        label = name if budget is None else f"{name}@{budget}"
        rec: list = []
        fn = make_generate_fn(record=rec, **{**cache_kwargs, **kw})
        it = zip(prompts, lengths)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(prompts), desc=f"icecache eval {label}", leave=False)
        outs = []
        for ids, n_new in it:
            new = fn(model, tokenizer, ids, n_new)
            outs.append(tokenizer.decode(_cut_at_eos(new.tolist(), tokenizer.eos_token_id), skip_special_tokens=True))
        outputs[label] = outs
        correct = sum(answer_matches(o, ex["answer"]) for o, ex in zip(outs, examples))
        mem = [r["device_bytes"] for r in rec]
        rows.append({"method": name, "budget": budget, "accuracy": correct / len(examples), "correct": correct,
                     "n": len(examples), "same_as_full": sum(a == b for a, b in zip(outs, outputs["full"])),
                     "device_kv_bytes_mean": sum(mem) / len(mem), "device_kv_bytes_max": max(mem)})
    full_mem = rows[0]["device_kv_bytes_mean"]
    for r in rows:
        r["memory_vs_full"] = r["device_kv_bytes_mean"] / full_mem if full_mem else None
    return {"rows": rows, "outputs": outputs,
            "prompt_tokens": {"mean": sum(p.shape[1] for p in prompts) / len(prompts),
                              "max": max(p.shape[1] for p in prompts)}}


def format_rows(result: dict) -> str:
    """The table of :func:`evaluate`'s rows."""
    lines = [f"  {'cache':<14} {'budget':>6} {'accuracy':>9} {'correct':>9} {'same as full':>12} "
             f"{'device KV KiB':>14} {'vs full':>8}"]
    for r in result["rows"]:
        lines.append(f"  {r['method']:<14} {str(r['budget'] or 'all'):>6} {r['accuracy']:>9.3f} "
                     f"{r['correct']:>4}/{r['n']:<4} {r['same_as_full']:>7}/{r['n']:<4} "
                     f"{r['device_kv_bytes_mean'] / 2**10:>14.1f} {r['memory_vs_full']:>8.3f}")
    return "\n".join(lines)
