"""The testbed ``arith`` task as TIP's default workload: its prompts and its batched accuracy.

Used by ``scrimp tip distill`` when no ``--prompts`` file is given, by the demo and by
``bench/bench_tip.py``; the library itself (:class:`scrimp.tip.OnPolicyDistiller`) takes any prompt
source.
"""
from __future__ import annotations

from typing import Callable, List

import torch


def arith_prompts(tokenizer, rank: int = 0) -> Callable[[int, int], List[List[int]]]:
    """Prompt source for the testbed ``arith`` task: ``f(step, batch_size)`` -> token id lists. Seeds start
    at 10^7 (disjoint from the evaluation seeds) and differ per step and rank."""
    from ..testbed import tasks

    def make(step: int, batch_size: int) -> List[List[int]]:
        base = 10_000_000 + (step * 1009 + rank) * batch_size
        return [tasks.arith(seed=base + j, tokenizer=tokenizer).prompt_ids for j in range(batch_size)]

    return make


@torch.no_grad()
def arith_accuracy(model, tokenizer, n: int = 50, seed: int = 0, batch_size: int = 64, max_new_tokens: int = 128,
                   style: str = "teacher") -> dict:
    """Batched greedy version of ``scrimp.testbed.evaluate(model, tok, "arith", n, seed)``: the same
    examples (seeds ``seed * 1_000_003 + i``), budget, answer extraction and exact-match rule, with the
    prompts left-padded into batches (much faster on CPU). Returns ``{"accuracy", "n", "results"}``."""
    from ..testbed import tasks
    from ..testbed.evaluate import arith_final_answer

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    exs = [tasks.arith(seed=seed * 1_000_003 + i, style=style, tokenizer=tokenizer) for i in range(n)]
    results = []
    try:
        for b0 in range(0, n, batch_size):
            chunk = exs[b0:b0 + batch_size]
            P = max(len(e.prompt_ids) for e in chunk)
            ids = torch.full((len(chunk), P), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, e in enumerate(chunk):
                ids[i, P - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
                attn[i, P - len(e.prompt_ids):] = 1
            out = model.generate(ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=True)
            for e, row in zip(chunk, out[:, P:].tolist()):
                new = row[:row.index(eos)] if eos in row else row
                text = tokenizer.decode(new, skip_special_tokens=True)
                got = arith_final_answer(text)
                results.append({"expected": e.answer, "got": got, "output": text, "correct": got == e.answer})
    finally:
        if was_training:
            model.train()
    return {"accuracy": sum(r["correct"] for r in results) / n, "n": n, "results": results}


def testbed_spec(name: str) -> str:
    """A bare testbed name (``arith-teacher``) as a model spec; specs and directories unchanged."""
    from .. import testbed

    return f"testbed:{name}" if name in testbed.MODELS else name


def arith_step_batch(student: str, teacher: str, batch: int, device: str, dt):
    """Testbed models (names or HF directories) and a batch of arith prompts + student-style completions."""
    from ..models import load_model
    from ..testbed import tasks

    s, tok = load_model(testbed_spec(student), device="cpu")
    t, _ = load_model(testbed_spec(teacher), device="cpu")
    exs = [tasks.arith(seed=20_000_000 + i, style="student", tokenizer=tok) for i in range(batch)]
    seqs = [e.prompt_ids + e.completion_ids + [tok.eos_token_id] for e in exs]
    L = max(len(x) for x in seqs)
    ids = torch.full((batch, L), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros(batch, L, dtype=torch.bool)
    for i, (e, x) in enumerate(zip(exs, seqs)):
        ids[i, :len(x)] = torch.tensor(x)
        attn[i, :len(x)] = 1
        resp[i, len(e.prompt_ids):len(x)] = True
    return s.to(device, dt), t.to(device, dt).eval(), ids.to(device), attn.to(device), resp.to(device)


def testbed_tokenizer():
    """The testbed tokenizer (it pads), for benchmarks whose models only need a pad-capable tokenizer."""
    from ..testbed import get_tokenizer

    return get_tokenizer()
