"""Accuracy / time-to-first-token / FLOPs of KV Packet and its baselines on any prompts: one row per
method (full recompute, no recompute, KV Packet, CacheBlend-r, EPIC)."""
from __future__ import annotations

import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import method as M
from .prompt import Prompt

__all__ = ["DEFAULT_ADAPTERS", "compare_methods", "format_table", "load_adapters", "answer_matches", "ALL_METHODS"]

#: adapters shipped for the testbed ``recall`` model
DEFAULT_ADAPTERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "adapters", "recall.safetensors")

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


#: every method name compare_methods knows (plus kvpacket-knorm-<pct> / kvpacket-attn-<pct>)
ALL_METHODS = ("full", "none", "kvpacket", "cacheblend-10", "cacheblend-30", "cacheblend-50", "epic")
_CACHEBLEND = re.compile(r"^cacheblend-(\d{1,3})$")


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def answer_matches(generated: str, answer: str) -> bool:
    """Whether the reference ``answer`` appears in the ``generated`` text, both lower-cased with
    punctuation and repeated whitespace removed."""
    a = _normalize(answer)
    return bool(a) and f" {a} " in f" {_normalize(generated)} "


def _method_runner(name, model, tokenizer, adapters, store_bytes):
    """(answer_fn(prompt, max_new_tokens) -> (ids, ttft), logit_fn(prompt) -> logits, kind, extra) of a method."""
    pruning = pruning_of(name)
    if name == "full":
        return (lambda p, m: M.full_answer(model, p, m, tokenizer)), (lambda p: M.full_first_token_logits(model, p)), \
            "full", {}
    if name in ("none", "kvpacket") or pruning is not None:
        eng = M.PacketEngine(model, tokenizer, adapters if name != "none" else None, pruning=pruning,
                             store=M.PacketStore(host_bytes=store_bytes))

        def ans(p, m):
            a = eng.answer(prompt=p, max_new_tokens=m)
            return a.token_ids, a.ttft_s
        return ans, eng.first_token_logits, ("none" if name == "none" else "kvpacket"), {"engine": eng, "pruning": pruning}
    cb = _CACHEBLEND.match(name)
    if cb is not None or name == "epic":
        kw = {"ratio": int(cb.group(1)) / 100} if cb is not None else {"first_k": EPIC_K}
        if cb is not None and not 0 <= kw["ratio"] <= 1:
            raise ValueError(f"{name}: the recomputed percentage must be in 0..100")
        sr = M.SelectiveRecompute(model, tokenizer, store=M.PacketStore(host_bytes=store_bytes), **kw)
        return sr.answer, sr.first_token_logits, ("cacheblend" if cb is not None else "epic"), {"engine": sr.engine, **kw}
    raise ValueError(f"unknown method {name!r}; valid: {', '.join(ALL_METHODS)}, cacheblend-<pct>, "
                     "kvpacket-knorm-<pct>, kvpacket-attn-<pct>")


#: EPIC recomputes the first this many tokens of every document
EPIC_K = 16


def compare_methods(model, tokenizer, adapters: Optional[M.Adapters], prompts: Sequence[Prompt],
                    methods: Optional[Sequence[str]] = None, *, max_new_tokens: int = 32,
                    accuracy_fn: Optional[Callable] = None, fidelity: bool = True, progress: bool = False,
                    out=None, store_bytes: int = 2 << 30) -> List[Dict]:
    """One row per method: ``{method, n, accuracy, ttft_ms, flops, flops_llama8b, kl, agree, seconds,
    packet_bytes}`` over ``prompts``.

    ``accuracy``: share of the prompts with a reference answer (``prompt.answer``) whose answer
    :func:`answer_matches` the greedy generation (``max_new_tokens``), None when no prompt has one;
    ``accuracy_fn(answer_fn)`` replaces that scoring (``answer_fn(prompt, max_new_tokens) -> ids``).
    ``kl`` / ``agree``: mean KL(full || method) of the first answer token's distribution and how
    often its argmax equals full recompute's: how faithfully a method reproduces the full cache,
    with or without answers. ``flops``: mean FLOPs to prepare the context cache (question prefill and
    decoding excluded, the same for every method), ``flops_llama8b`` the same at Llama-3.1-8B's shape.
    """
    out = out if out is not None else sys.stdout
    prompts = list(prompts)
    if not prompts:
        raise ValueError("compare_methods: no prompts")
    methods = list(methods or ALL_METHODS)
    for name in methods:
        if (name == "kvpacket" or pruning_of(name)) and adapters is None:
            raise ValueError(f"{name} needs adapters (train them with `scrimp packets train`)")
    cfg = model.config
    big = llama8b_config()
    full_logits = []
    if fidelity:
        it = prompts
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(prompts, desc="full-attention reference", leave=False)
        full_logits = [M.full_first_token_logits(model, p) for p in it]
    scored = [p for p in prompts if p.answer]
    rows = []
    for name in methods:
        t0 = time.time()
        answer_fn, logit_fn, kind, extra = _method_runner(name, model, tokenizer, adapters, store_bytes)
        with_adapters = kind == "kvpacket"
        pruning = extra.get("pruning")

        def flops_of(config, p):
            lens = [len(d) for d in p.documents]
            kept = lens if pruning is None else [pruning.n_keep(n) for n in lens]
            return M.method_flops(config, kind, kept if with_adapters else lens, prefix_len=len(p.prefix),
                                  ratio=extra.get("ratio", 0.0), first_k=extra.get("first_k", 0),
                                  n_header=adapters.n_header_cached if with_adapters else 0,
                                  n_shared=adapters.n_header_shared if with_adapters else 0,
                                  n_trailer=adapters.n_trailer if with_adapters else 0)
        flops = sum(flops_of(cfg, p) for p in prompts) / len(prompts)
        flops_big = sum(flops_of(big, p) for p in prompts) / len(prompts)
        ttfts: List[float] = []

        def timed_answer(p, m):
            ids, ttft = answer_fn(p, m)
            ttfts.append(ttft)
            return ids
        if accuracy_fn is not None:
            accuracy = accuracy_fn(timed_answer)
        elif scored:
            it = scored
            if progress:
                from tqdm.auto import tqdm
                it = tqdm(scored, desc=name, leave=False)
            hits = 0
            for p in it:
                ids = timed_answer(p, max_new_tokens)
                hits += answer_matches(tokenizer.decode(ids, skip_special_tokens=True),
                                       tokenizer.decode(p.answer, skip_special_tokens=True))
            accuracy = hits / len(scored)
        else:
            accuracy = None
            for p in prompts:  # time to first token still measured
                timed_answer(p, 1)
        kl = agree = float("nan")
        if fidelity:
            kls, agr = [], []
            for p, fl in zip(prompts, full_logits):
                ml = logit_fn(p)
                lp, lq = torch.log_softmax(fl, -1), torch.log_softmax(ml, -1)
                kls.append(float((lp.exp() * (lp - lq)).sum()))
                agr.append(int(fl.argmax()) == int(ml.argmax()))
            kl, agree = sum(kls) / len(kls), sum(agr) / len(agr)
        eng = extra.get("engine")
        row = {"method": name, "n": len(prompts), "accuracy": accuracy, "ttft_ms": 1000 * _median(ttfts),
               "flops": flops, "flops_llama8b": flops_big, "kl": kl, "agree": agree, "seconds": time.time() - t0,
               # bytes of all packets this method stored for the prompts (packet methods only)
               "packet_bytes": eng.store.stats()["bytes_host"] if eng is not None else None}
        rows.append(row)
        acc = f"{100 * accuracy:5.1f}%" if accuracy is not None else "    -"
        print(f"  {name:<14} acc {acc}  KL {kl:.4f}  agree {100 * agree:5.1f}%  ttft {row['ttft_ms']:7.1f} ms  "
              f"flops {flops:9.3g}  ({row['seconds']:.0f}s)", file=out, flush=True)
    return rows


def format_table(rows: List[Dict], anchor: str = "full") -> str:
    """The rows of :func:`compare_methods` as a text table (ratios against the ``anchor`` method)."""
    base = next((r for r in rows if r["method"] == anchor), rows[0])
    hdr = (f"{'method':<14} {'accuracy':>9} {'vs full':>8} {'KL->full':>9} {'top1=full':>9} {'TTFT ms':>9} "
           f"{'TTFT x':>7} {'prep FLOPs':>11} {'FLOPs x':>9} {'@Llama-8B':>10} {'packets MiB':>11}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        if r["accuracy"] is None:
            acc = f"{'-':>9} {'-':>8}"
        else:
            vs = (f"{100 * (r['accuracy'] - base['accuracy']):+7.1f}" if base["accuracy"] is not None else f"{'-':>7}")
            acc = f"{100 * r['accuracy']:8.1f}% {vs}"
        lines.append(f"{r['method']:<14} {acc} "
                     f"{r.get('kl', float('nan')):9.4f} {100 * r.get('agree', float('nan')):8.1f}% {r['ttft_ms']:9.1f} "
                     f"{r['ttft_ms'] / base['ttft_ms']:7.2f} {r['flops']:11.3g} "
                     f"{r['flops'] / base['flops']:9.2g} {r['flops_llama8b']:10.3g} "
                     + (f"{r['packet_bytes'] / 2**20:11.2f}" if r.get("packet_bytes") is not None else f"{'-':>11}"))
    return "\n".join(lines)
