"""Accuracy / time-to-first-token / FLOPs of KV Packet and its baselines on the testbed ``recall`` task,
all through :func:`scrimp.testbed.evaluate` with a different ``generate_fn``."""
from __future__ import annotations

import os
import re
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import method as M

__all__ = ["DEFAULT_ADAPTERS", "RECALL_CONTEXT", "compare_methods", "format_table", "load_recall_model", "load_adapters"]

#: adapters shipped for the testbed ``recall`` model
DEFAULT_ADAPTERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adapters", "recall.safetensors")

#: context length (tokens) of the testbed comparison: the length the recall model is trained for. At
#: 1,024 tokens no recompute already matches full recompute on this task (KL 0.0008 on the first answer
#: token), so there is nothing for adapters or recompute to restore; at 2,048 there is.
RECALL_CONTEXT = 2048


def load_recall_model():
    """The testbed ``recall`` model and tokenizer (FileNotFoundError while it is not shipped)."""
    from .. import testbed

    return testbed.load("recall")


def load_adapters(model, path: Optional[str] = None) -> M.Adapters:
    return M.Adapters.load(path or DEFAULT_ADAPTERS, model)


def llama8b_config():
    """The shape of Llama-3.1-8B (no weights): FLOPs at the paper's model size, analytically."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256)


#: ``kvpacket-<score>-<percent kept>``: KV Packet with pruned packets (e.g. kvpacket-knorm-50)
_PRUNED = re.compile(r"^kvpacket-(knorm|attn)-(\d{1,3})$")
_PRUNE_SCORES = {"knorm": "key_norm", "attn": "attention"}


def pruning_of(name: str):
    """The :class:`~scrimp.packets.prune.Pruning` a method name asks for, or None."""
    from .prune import Pruning

    m = _PRUNED.match(name)
    if m is None:
        return None
    pct = int(m.group(2))
    if not 0 < pct <= 100:
        raise ValueError(f"{name}: the kept percentage must be in 1..100, got {pct}")
    return Pruning(score=_PRUNE_SCORES[m.group(1)], keep=pct / 100)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def compare_methods(model, tokenizer, adapters: Optional[M.Adapters], n: int = 20, context_tokens: int = RECALL_CONTEXT,
                    seed: int = 0, methods: Optional[Sequence[str]] = None, cacheblend_ratios=(0.1, 0.3, 0.5),
                    epic_k: int = 16, out=None, fidelity: bool = True) -> List[Dict]:
    """Rows ``{method, accuracy, ttft_ms, flops, flops_llama8b, kl, agree}`` for the chosen methods
    (default: all). ``kl`` / ``agree``: mean KL(full || method) of the first answer token's
    distribution and how often its argmax equals full recompute's (over the same ``n`` examples); a
    weight-independent measure of how faithfully a method reproduces the full cache."""
    from .. import testbed

    out = out if out is not None else sys.stdout
    all_methods = ["full", "none", "kvpacket"] + [f"cacheblend-{int(r * 100)}" for r in cacheblend_ratios] + ["epic"]
    methods = list(methods or all_methods)
    for name in methods:
        if (name == "kvpacket" or pruning_of(name)) and adapters is None:
            raise ValueError(f"{name} needs adapters (train them with `scrimp packets train`)")
    store = None
    rows = []
    ex0 = testbed.tasks.recall(seed=seed * 1_000_003, context_tokens=context_tokens, tokenizer=tokenizer)
    _, docs, _ = M.split_prompt(ex0.prompt_ids, tokenizer)
    doc_lens = [len(d) for d in docs]
    cfg = model.config
    big = llama8b_config()
    prompts = [testbed.tasks.recall(seed=seed * 1_000_003 + i, context_tokens=context_tokens, tokenizer=tokenizer).prompt_ids
               for i in range(n)]
    full_logits = [M.full_first_token_logits(model, p) for p in prompts] if fidelity else []
    for name in methods:
        t0 = time.time()
        recomputed = 0.0
        eng = None
        if name == "full":
            ttfts: List[float] = []
            fn = M.full_recompute_generate(ttfts)
            logit_fn = lambda p: M.full_first_token_logits(model, p)  # noqa: E731
            flops = M.method_flops(cfg, "full", doc_lens)
        elif name in ("none", "kvpacket") or pruning_of(name):
            pruning = pruning_of(name)
            eng = M.PacketEngine(model, tokenizer, adapters if name != "none" else None, pruning=pruning)
            fn, ttfts, logit_fn = eng.generate, eng.ttfts, eng.first_token_logits
            kept_lens = doc_lens if pruning is None else [pruning.n_keep(n) for n in doc_lens]
            flops = M.method_flops(cfg, "none" if name == "none" else "kvpacket", kept_lens,
                                   n_header=adapters.n_header_cached if name != "none" else 0,
                                   n_shared=adapters.n_header_shared if name != "none" else 0,
                                   n_trailer=adapters.n_trailer if name != "none" else 0)
        elif name.startswith("cacheblend-"):
            r = int(name.split("-")[1]) / 100
            sr = M.SelectiveRecompute(model, tokenizer, ratio=r)
            fn, ttfts, logit_fn = sr.generate, sr.ttfts, sr.first_token_logits
            flops = M.method_flops(cfg, "cacheblend", doc_lens, ratio=r)
        elif name == "epic":
            sr = M.SelectiveRecompute(model, tokenizer, first_k=epic_k)
            fn, ttfts, logit_fn = sr.generate, sr.ttfts, sr.first_token_logits
            flops = M.method_flops(cfg, "epic", doc_lens, first_k=epic_k)
        else:
            raise ValueError(f"unknown method {name!r}; valid: {', '.join(all_methods)}, "
                             "kvpacket-knorm-<pct>, kvpacket-attn-<pct>")
        kind = {"full": "full", "none": "none", "kvpacket": "kvpacket", "epic": "epic"}.get(
            name, "kvpacket" if pruning_of(name) else "cacheblend")
        with_adapters = kind == "kvpacket"
        flops_big = M.method_flops(big, kind, kept_lens if with_adapters else doc_lens,
                                   ratio=int(name.split("-")[1]) / 100 if kind == "cacheblend" else 0.0,
                                   first_k=epic_k, n_header=adapters.n_header_cached if with_adapters else 0,
                                   n_shared=adapters.n_header_shared if with_adapters else 0,
                                   n_trailer=adapters.n_trailer if with_adapters else 0)
        res = testbed.evaluate(model, tokenizer, "recall", n=n, seed=seed, context_tokens=context_tokens, generate_fn=fn)
        kl = agree = float("nan")
        if fidelity:
            kls, agr = [], []
            for p, fl in zip(prompts, full_logits):
                ml = logit_fn(p)
                lp, lq = torch.log_softmax(fl, -1), torch.log_softmax(ml, -1)
                kls.append(float((lp.exp() * (lp - lq)).sum()))
                agr.append(int(fl.argmax()) == int(ml.argmax()))
            kl, agree = sum(kls) / len(kls), sum(agr) / len(agr)
        row = {"method": name, "n": n, "accuracy": res["accuracy"], "ttft_ms": 1000 * _median(ttfts),
               "flops": flops, "flops_llama8b": flops_big, "kl": kl, "agree": agree, "seconds": time.time() - t0,
               # bytes of all packets this method stored for the n prompts (packet methods only)
               "packet_bytes": eng.store.stats()["bytes_host"] if eng is not None else None}
        rows.append(row)
        print(f"  {name:<14} acc {100 * row['accuracy']:5.1f}%  KL {kl:.4f}  agree {100 * agree:5.1f}%  "
              f"ttft {row['ttft_ms']:7.1f} ms  "
              f"flops {flops:9.3g}  ({row['seconds']:.0f}s)", file=out, flush=True)
    return rows


def format_table(rows: List[Dict], anchor: str = "full") -> str:
    base = next((r for r in rows if r["method"] == anchor), rows[0])
    hdr = (f"{'method':<14} {'accuracy':>9} {'vs full':>8} {'KL->full':>9} {'top1=full':>9} {'TTFT ms':>9} "
           f"{'TTFT x':>7} {'prep FLOPs':>11} {'FLOPs x':>9} {'@Llama-8B':>10} {'packets MiB':>11}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(f"{r['method']:<14} {100 * r['accuracy']:8.1f}% {100 * (r['accuracy'] - base['accuracy']):+7.1f} "
                     f"{r.get('kl', float('nan')):9.4f} {100 * r.get('agree', float('nan')):8.1f}% {r['ttft_ms']:9.1f} {r['ttft_ms'] / base['ttft_ms']:7.2f} {r['flops']:11.3g} "
                     f"{r['flops'] / base['flops']:9.2g} {r['flops_llama8b']:10.3g} "
                     + (f"{r['packet_bytes'] / 2**20:11.2f}" if r.get("packet_bytes") is not None else f"{'-':>11}"))
    return "\n".join(lines)
