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
             max_new_tokens: Optional[int] = None, progress: bool = False) -> dict:
    """Greedy exact-match accuracy of ``model`` on ``n`` examples of ``task``.

    Example ``i`` is ``tasks.recall(seed=seed * 1_000_003 + i, context_tokens=...)`` or
    ``tasks.arith(seed=seed * 1_000_003 + i, style=style)``, tokenized with ``tokenizer``.
    ``context_tokens`` sets the recall context length (default 512 tokens).
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
                ex = tasks.recall(seed=s, context_tokens=context_tokens, tokenizer=tokenizer)
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
