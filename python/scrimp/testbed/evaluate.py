"""Exact-match evaluation of testbed (or real) models on the testbed tasks."""
from __future__ import annotations

from typing import Callable, Optional

TASKS = ("recall", "arith")


def greedy_generate(model, tokenizer, prompt_ids, max_new_tokens):
    """Default ``generate_fn``: greedy ``model.generate`` with the full KV cache."""
    import torch

    attn = torch.ones_like(prompt_ids)
    with torch.no_grad():
        out = model.generate(
            prompt_ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            use_cache=True)
    return out[0, prompt_ids.shape[1]:]


def _cut_at_eos(ids, eos_id):
    ids = [int(i) for i in ids]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def arith_final_answer(text: str) -> str:
    """The final answer of an arith completion: the text after the last ``</think>``
    (empty if the model never closed its thinking)."""
    if "</think>" not in text:
        return ""
    return text.rsplit("</think>", 1)[1].strip()


def evaluate(model, tokenizer, task: str, n: int = 100, seed: int = 0,
             context_tokens: Optional[int] = None,
             generate_fn: Optional[Callable] = None, style: str = "teacher",
             max_new_tokens: Optional[int] = None, progress: bool = False,
             filler_share: float = 0.0) -> dict:
    """Greedy exact-match accuracy of ``model`` on ``n`` examples of ``task``.

    Example ``i`` is ``tasks.recall(seed=seed * 1_000_003 + i, context_tokens=...)`` or
    ``tasks.arith(seed=seed * 1_000_003 + i, style=style)``, tokenized with ``tokenizer``.
    ``context_tokens`` sets the recall context length (default 512 tokens); ``filler_share`` the
    share of it given to filler lines (``tasks.recall(filler_share=)``; 8,192-token contexts need it).
    ``generate_fn(model, tokenizer, prompt_ids, max_new_tokens) -> new_token_ids``
    (``prompt_ids`` a ``[1, L]`` LongTensor) replaces the default greedy
    ``model.generate`` with the full cache. Returns ``{"accuracy", "n", "task",
    "context_tokens", "results": [{"prompt", "expected", "got", "output", "correct"}]}``.
    """
    import torch
    from . import tasks

    if not isinstance(task, str):
        raise TypeError(f"task must be a str, got {type(task).__name__}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if context_tokens is not None:
        if task != "recall":
            raise ValueError("context_tokens only applies to task='recall'")
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int):
            raise TypeError(f"context_tokens must be an int, got {type(context_tokens).__name__}")
    if filler_share and task != "recall":
        raise ValueError("filler_share only applies to task='recall'")
    if generate_fn is not None and not callable(generate_fn):
        raise TypeError("generate_fn must be callable(model, tokenizer, prompt_ids, max_new_tokens)")
    gen = generate_fn or greedy_generate
    if task == "recall" and context_tokens is None:
        context_tokens = 512

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = []
    it = range(n)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"eval {task}", leave=False)
    try:
        for i in it:
            s = seed * 1_000_003 + i
            if task == "recall":
                ex = tasks.recall(seed=s, context_tokens=context_tokens, tokenizer=tokenizer,
                                  filler_share=filler_share)
                budget = max_new_tokens or len(ex.answer_ids) + 1
            else:
                ex = tasks.arith(seed=s, style=style, tokenizer=tokenizer)
                budget = max_new_tokens or 128
            prompt_ids = torch.tensor([ex.prompt_ids], dtype=torch.long, device=device)
            new = gen(model, tokenizer, prompt_ids, budget)
            new = _cut_at_eos(new, tokenizer.eos_token_id)
            output = tokenizer.decode(new, skip_special_tokens=True)
            got = output.strip() if task == "recall" else arith_final_answer(output)
            results.append({"prompt": ex.prompt, "expected": ex.answer, "got": got,
                            "output": output, "correct": got == ex.answer})
    finally:
        if was_training:
            model.train()
    acc = sum(r["correct"] for r in results) / len(results)
    return {"task": task, "n": n, "seed": seed, "context_tokens": context_tokens,
            "accuracy": acc, "results": results}


#: words only the student style uses (connectives, fillers and the restatement's operation words)
STUDENT_STYLE_WORDS = ("Okay", "Alright", "hmm", "Hmm", "um", "Um", "Wait", "Done", "Yeah", "Right",
                       "plus", "minus", "times")


def writes_teacher_style(text: str) -> bool:
    """True when an arith completion uses none of the student style's words."""
    import re
    words = set(re.findall(r"[A-Za-z]+", text))
    return not words & set(STUDENT_STYLE_WORDS)


def arith_continuation(model, tokenizer, n: int = 200, seed: int = 0, style: str = "student",
                       batch_size: int = 64, max_new_tokens: int = 128) -> dict:
    """Greedy exact match of ``model`` continuing arith traces written in another style.

    Example ``i`` is ``tasks.arith(seed * 1_000_003 + i, style=style)`` (``style`` "teacher" or
    "student") or, for ``style="mixed"``, ``tasks.arith_mixed(seed * 1_000_003 + i,
    student_share=0.5)``; its completion is cut right after one of its style segments (drawn
    uniformly, ``random.Random(f"cut:{seed}:{i}")``), the prompt plus that prefix is given to the
    model, and the final answer of prefix + continuation must equal the reference. This is what a
    TESSY teacher faces: a trace whose style spans another model wrote. Prompts are left-padded
    into batches of ``batch_size``. Returns ``{"accuracy", "n", "style", "results": [{"prefix",
    "output", "expected", "got", "correct"}]}``."""
    import random

    import torch
    from . import tasks

    if style not in ("teacher", "student", "mixed"):
        raise ValueError(f"unknown style {style!r}; valid: teacher, student, mixed")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    items = []
    for i in range(n):
        s = seed * 1_000_003 + i
        ex = (tasks.arith_mixed(s, student_share=0.5, tokenizer=tokenizer) if style == "mixed"
              else tasks.arith(s, style=style, tokenizer=tokenizer))
        ends, pos = [], 0
        for text, lab in ex.segments:
            pos += len(text)
            if lab == tasks.STYLE:
                ends.append(pos)
        cut = random.Random(f"cut:{seed}:{i}").choice(ends)
        prefix = ex.completion[:cut]
        ids = list(tokenizer(ex.prompt + prefix, add_special_tokens=False)["input_ids"])
        items.append((ex, prefix, ids))
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    results = []
    try:
        for b0 in range(0, n, batch_size):
            chunk = items[b0:b0 + batch_size]
            P = max(len(x[2]) for x in chunk)
            inp = torch.full((len(chunk), P), pad, dtype=torch.long)   # [B, P] left-padded
            att = torch.zeros_like(inp)
            for r, (_, _, ids) in enumerate(chunk):
                inp[r, P - len(ids):] = torch.tensor(ids)
                att[r, P - len(ids):] = 1
            with torch.no_grad():
                out = model.generate(inp.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                                     do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True)
            for (ex, prefix, _), row in zip(chunk, out[:, P:].tolist()):
                new = _cut_at_eos(row, eos)
                text = tokenizer.decode(new, skip_special_tokens=True)
                got = arith_final_answer(prefix + text)
                results.append({"prefix": prefix, "output": text, "expected": ex.answer, "got": got,
                                "correct": got == ex.answer})
    finally:
        if was_training:
            model.train()
    return {"accuracy": sum(r["correct"] for r in results) / n, "n": n, "seed": seed, "style": style,
            "results": results}
