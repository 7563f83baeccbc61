"""A short supervised fine-tuning loop for chat records (scrimp's own, no TRL).

Each record is one user prompt and one assistant completion; the prompt is
rendered with the tokenizer's chat template (generation prompt included), the
completion is followed by ``eos``, and the loss is taken on the completion
tokens only. AdamW with warmup + cosine decay, a fixed number of steps."""
from __future__ import annotations

import copy
import math
import random
import time
from typing import List, Optional, Sequence

__all__ = ["sft", "encode_chat", "baseline_records"]


def encode_chat(tokenizer, prompt: str, completion: str):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    p = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return p + c, [0] * len(p) + [1] * len(c)


def sft(model, tokenizer, records: Sequence[dict], steps: int = 100, batch_size: int = 16, lr: float = 5e-4,
        seed: int = 0, warmup: int = 10, copy_model: bool = True, log=None) -> tuple:
    """Fine-tune ``model`` on ``records`` (``{"prompt", "completion"}``) for ``steps``
    optimizer steps. Returns ``(model, metrics)``; with ``copy_model`` the input model
    is left untouched."""
    import torch
    if not records:
        raise ValueError("no SFT records")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if copy_model:
        model = copy.deepcopy(model)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    data = [encode_chat(tokenizer, r["prompt"], r["completion"]) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    order: List[int] = []
    t0 = time.time()
    ema = None
    for step in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(data)))
                rng.shuffle(order)
            batch.append(data[order.pop()])
        n = max(len(x) for x, _ in batch)
        inp = torch.full((len(batch), n), pad, dtype=torch.long)
        att = torch.zeros_like(inp)
        lab = torch.full_like(inp, -100)
        for b, (ids, m) in enumerate(batch):
            t = torch.tensor(ids)
            inp[b, :len(ids)] = t
            att[b, :len(ids)] = 1
            t = t.clone()
            t[torch.tensor(m) == 0] = -100
            lab[b, :len(ids)] = t
        f = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        loss = model(input_ids=inp, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"sft step {step + 1}/{steps} loss {ema:.4f}")
    model.eval()
    return model, {"steps": steps, "final_loss": ema, "seconds": time.time() - t0, "records": len(records)}


def baseline_records(backend, problems: Sequence[dict], max_tokens: int = 128, params=None,
                     think_open: str = "<think>") -> List[dict]:
    """Single-model traces (the Teacher-Only / Student-Only baselines): ``backend``
    writes the whole completion after the generation prompt, batched."""
    from .backends import GenParams
    tok = backend.tokenizer
    params = params or GenParams()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                       add_generation_prompt=True) for p in problems]
    res = backend.generate_batch(prompts, max_tokens, params)
    out = []
    for p, r in zip(problems, res):
        comp = r.text
        ans = comp.rsplit("</think>", 1)[1].strip() if "</think>" in comp else ""
        out.append({"id": p.get("id"), "prompt": p["prompt"], "completion": comp, "answer": ans,
                    "reference": p.get("reference"), "finish_reason": r.finish_reason,
                    "status": "ok" if r.finish_reason == "stop" and "</think>" in comp else "failed"})
    return out
