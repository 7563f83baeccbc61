"""Prompts for on-policy distillation: a JSONL file rendered into token ids, and the per-step prompt source.

Each non-blank line of the file is one JSON object with either

* ``"prompt": str`` - one user turn, or
* ``"messages": [{"role": str, "content": str}, ...]`` - a conversation whose last turn is not the
  assistant's (the student writes the next assistant turn);

other keys (an ``"answer"``, an ``"id"``) are ignored. With a chat template the tokenizer renders both
forms with ``add_generation_prompt=True``; without one a ``prompt`` is tokenized as plain text and
``messages`` are refused. Malformed lines raise one ValueError listing each as
``FILE:LINE: <reason>; expected ...`` (:func:`scrimp.jsonl.read_jsonl`).

:func:`prompt_source` turns the rendered prompts into ``f(micro_batch_index, batch_size)`` for
:meth:`scrimp.tip.OnPolicyDistiller.train`: a fixed function of the index, the seed and the rank, so a
resumed run draws exactly the prompts the uninterrupted run would have.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence

from ..jsonl import read_jsonl

EXPECTED = ('a JSON object {"prompt": str} or {"messages": [{"role": str, "content": str}, ...]} '
            '(other keys are ignored)')


def read_prompt_file(path: str) -> List[Dict]:
    """The validated records of a prompts JSONL file: ``[{"line": n, "prompt": str} | {"line": n, "messages": [...]}]``."""
    return read_jsonl(path, _check_prompt, EXPECTED)


def _check_prompt(obj: dict, n: int) -> Dict:
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        raise ValueError(f"{'both' if has_p else 'neither'} \"prompt\" and \"messages\"")
    if has_p:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise ValueError(f"\"prompt\" must be a non-empty string, got {obj['prompt']!r:.80}")
        return {"line": n, "prompt": obj["prompt"]}
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("\"messages\" must be a non-empty list")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages[{i}] must be {{\"role\": str, \"content\": str}}, got {m!r:.80}")
    if msgs[-1]["role"] == "assistant":
        raise ValueError("the last message is the assistant's; the student writes the next assistant turn, so "
                         "end with a user (or system/tool) message")
    return {"line": n, "messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}


def render_prompt(record: Dict, tokenizer, where: str = "prompt") -> List[int]:
    """Token ids of one record: the chat template (with the generation prompt) when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        msgs = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if "messages" in record:
        raise ValueError(f"{where}: \"messages\" need a chat template and the student's tokenizer has none; "
                         "use {\"prompt\": str} lines")
    return list(tokenizer(record["prompt"])["input_ids"])


def load_prompts(path: str, tokenizer, max_prompt_tokens: Optional[int] = None) -> List[List[int]]:
    """Read, validate and render a prompts JSONL file into token id lists (see the module docstring).

    A prompt longer than ``max_prompt_tokens`` raises ValueError naming its line.
    """
    out = []
    for rec in read_prompt_file(path):
        where = f"{path}:{rec['line']}"
        ids = render_prompt(rec, tokenizer, where)
        if not ids:
            raise ValueError(f"{where}: the prompt renders to no tokens")
        if max_prompt_tokens and len(ids) > max_prompt_tokens:
            raise ValueError(f"{where}: the prompt is {len(ids)} tokens, over the limit of {max_prompt_tokens}")
        out.append(ids)
    return out


def prompt_source(prompts: Sequence[Sequence[int]], seed: int = 0, rank: int = 0,
                  world: int = 1) -> Callable[[int, int], List[List[int]]]:
    """``f(i, batch_size)`` -> the prompts of micro-batch ``i`` on this rank.

    The prompts are visited epoch by epoch, each epoch in its own seeded random order; micro-batch ``i`` of
    rank ``r`` takes the ``batch_size`` prompts at global positions ``((i * world) + r) * batch_size + j``,
    so ranks never share a prompt within an epoch.
    """
    if not prompts:
        raise ValueError("prompt_source: no prompts")
    items = [list(p) for p in prompts]
    n = len(items)
    orders: Dict[int, List[int]] = {}

    def order(epoch: int) -> List[int]:
        if epoch not in orders:
            perm = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(perm)
            orders.clear()  # one epoch's order in memory (recomputed, identically, when revisited)
            orders[epoch] = perm
        return orders[epoch]

    def make(i: int, batch_size: int) -> List[List[int]]:
        out = []
        for j in range(batch_size):
            g = (i * world + rank) * batch_size + j
            out.append(items[order(g // n)[g % n]])
        return out

    return make
