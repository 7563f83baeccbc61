"""Evaluation helpers: a generate_fn per method for scrimp.testbed.evaluate, and the demo section."""
from __future__ import annotations

import time

import torch

from .cache import IceCache


def make_generate_fn(method="icecache", budget=256, record=None, **kwargs):
    """A ``generate_fn(model, tokenizer, prompt_ids, max_new_tokens)`` using a fresh IceCache per call.

    ``record`` (a list) receives each call's ``cache.stats()`` plus the prompt length and seconds.
    """

    def generate_fn(model, tokenizer, prompt_ids, max_new_tokens):
        cache = IceCache(model.config, budget=budget, method=method, **kwargs)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), past_key_values=cache,
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        dt = time.perf_counter() - t0
        new = out[0, prompt_ids.shape[1]:]
        if record is not None:
            s = cache.stats()
            s.update(prompt_tokens=int(prompt_ids.shape[1]), seconds=dt, new_tokens=int(new.numel()))
            record.append(s)
        return new

    return generate_fn


def demo_section(quick: bool = True) -> str:
    """Accuracy and device memory of IceCache (budget 256) vs the full KV cache on the testbed recall task."""
    from .. import testbed

    try:
        model, tok = testbed.load("recall")
    except FileNotFoundError as e:
        return f"IceCache: testbed model 'recall' not available ({e})"
    n = 12 if quick else 50
    rows = []
    for method in ("full", "icecache"):
        rec = []
        res = testbed.evaluate(model, tok, "recall", n=n, context_tokens=2048,
                               generate_fn=make_generate_fn(method, budget=256, record=rec))
        dev = sum(r["device_bytes"] for r in rec) / max(len(rec), 1)
        rows.append((method, res["accuracy"], dev))
    full_acc, full_mem = rows[0][1], rows[0][2]
    lines = [f"IceCache on testbed recall (n={n}, context 2048, budget 256, page 16, sink 2, window 2, dense 2):",
             f"  {'cache':<10} {'accuracy':>9} {'rel. acc':>9} {'device KV MiB':>14} {'rel. mem':>9}"]
    for m, acc, mem in rows:
        rel = acc / full_acc if full_acc else float('nan')
        lines.append(f"  {m:<10} {acc:>9.3f} {rel:>9.3f} {mem / 2**20:>14.2f} {mem / full_mem:>9.3f}")
    return "\n".join(lines)
