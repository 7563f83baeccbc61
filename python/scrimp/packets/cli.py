"""``scrimp packets train|eval``: train KV Packet adapters and compare against the baselines."""
from __future__ import annotations

import argparse
import json

from ..cli import register_command
from .compare import RECALL_CONTEXT


def _load_model(name: str):
    from .. import testbed

    return testbed.load(name)


def _run_train(args) -> int:
    import torch

    from .compare import DEFAULT_ADAPTERS
    from .train import train_adapters

    torch.manual_seed(args.seed)
    model, tok = _load_model(args.model)
    ad, hist = train_adapters(model, tok, n_train=args.n_train, epochs=args.epochs, context_tokens=args.context_tokens,
                              lr=args.lr, n_header=args.n_header, n_trailer=args.n_trailer, seed=args.seed,
                              max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                              progress=not args.quiet, header_kv=args.header_kv)
    out = args.out or DEFAULT_ADAPTERS
    ad.save(out, model)
    k = min(16, len(hist["loss"]))
    metrics = {"steps": hist["steps"], "seconds": round(hist["seconds"], 1), "stopped_early": hist["stopped_early"],
               "loss_first": sum(hist["loss"][:k]) / max(1, k), "loss_last": sum(hist["loss"][-k:]) / max(1, k),
               "adapters": out, "adapter_id": ad.adapter_id}
    if args.eval_n:
        from .compare import compare_methods
        rows = compare_methods(model, tok, ad, n=args.eval_n, context_tokens=args.context_tokens,
                               methods=["full", "none", "kvpacket"])
        metrics.update({f"accuracy_{r['method']}": r["accuracy"] for r in rows})
    print(json.dumps(metrics), flush=True)
    return 0


def _run_eval(args) -> int:
    from .compare import compare_methods, format_table, load_adapters

    model, tok = _load_model(args.model)
    ad = load_adapters(model, args.adapters)
    rows = compare_methods(model, tok, ad, n=args.n, context_tokens=args.context_tokens, seed=args.seed,
                           methods=args.methods or None)
    print(format_table(rows))
    return 0


def _build(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="packets_command", metavar="{train,eval}")
    sub.required = True
    t = sub.add_parser("train", help="train header/trailer adapters (base model frozen)")
    t.add_argument("--model", default="recall", help="testbed model name (default recall)")
    t.add_argument("--out", default=None, help="adapter file (default: the shipped scrimp/packets/adapters/recall.safetensors)")
    t.add_argument("--n-train", type=int, default=64)
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--context-tokens", type=int, default=RECALL_CONTEXT)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--n-header", type=int, default=8)
    t.add_argument("--n-trailer", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--header-kv", choices=("every", "once", "none"), default="every",
                   help="where the header's K/V go: in every packet (the paper), one shared copy before the first "
                        "document, or nowhere (build-time context only); the last two assemble and re-rotate fewer tokens")
    t.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    t.add_argument("--eval-n", type=int, default=0, help="evaluate full / none / kvpacket on this many examples")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_run_train)
    e = sub.add_parser("eval", help="accuracy / TTFT / FLOPs of KV Packet and the baselines")
    e.add_argument("--model", default="recall")
    e.add_argument("--adapters", default=None)
    e.add_argument("--n", type=int, default=20)
    e.add_argument("--context-tokens", type=int, default=RECALL_CONTEXT)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--methods", nargs="*", default=None,
                   help="subset of: full none kvpacket cacheblend-10 cacheblend-30 cacheblend-50 epic")
    e.set_defaults(func=_run_eval)


register_command("packets", "KV Packet: train adapters, compare with recompute baselines", _build)
