"""``scrimp packets train|eval``: train KV Packet adapters on a JSONL file (or the testbed) and compare
KV Packet with the recompute baselines."""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli import add_common_arguments, register_command, write_json
from ..models import add_model_arguments, load_model
from .compare import ALL_METHODS
from .bench import RECALL_CONTEXT
from .method import Adapters

#: the model the commands use when none is named (the shipped example, with shipped adapters)
DEFAULT_MODEL = "testbed:recall"


def _prompts_from_file(args, tok):
    from .data import read_examples
    from .prompt import build_prompt

    examples = read_examples(args.data, on_error="skip" if args.skip_bad_lines else "stop")
    prompts = []
    for ex in examples:
        try:
            prompts.append(build_prompt(tok, ex.documents, ex.question, answer=ex.answer,
                                        use_chat_template=not args.no_chat_template))
        except ValueError as e:
            raise ValueError(f"{args.data}:{ex.line}: {e}") from None
    return prompts


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {n}")
    return n


def _is_testbed_recall(spec: str) -> bool:
    return spec.strip() == DEFAULT_MODEL


def _run_train(args) -> int:
    import torch

    from .compare import DEFAULT_ADAPTERS
    from .train import train_adapters

    torch.manual_seed(args.seed)
    if args.data is None and not _is_testbed_recall(args.model):
        raise SystemExit(f"scrimp packets train: --data FILE.jsonl is required for --model {args.model} "
                         f"(only {DEFAULT_MODEL} has built-in training prompts)")
    if args.out is None and not _is_testbed_recall(args.model):
        raise SystemExit("scrimp packets train: --out ADAPTERS.safetensors is required")
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.data is not None:
        prompts = _prompts_from_file(args, tok)
        max_answer = args.max_answer_tokens
        heldout = args.heldout
    else:  # the testbed recall task: fresh prompts far from the evaluation seeds
        from .bench import recall_prompts

        prompts = recall_prompts(tok, args.n_train, args.context_tokens, seed=args.seed, training=True)
        max_answer = [len(p.answer) + 1 for p in prompts]
        for p in prompts:
            p.answer = None  # self-distillation on the teacher's own greedy answer
        heldout = 0 if args.heldout is None else args.heldout
    if heldout is None:
        heldout = 0.1
    out = args.out or DEFAULT_ADAPTERS
    ckpt = args.checkpoint or out + ".train.pt"
    ad, hist = train_adapters(model, prompts, tokenizer=tok, steps=args.steps, epochs=args.epochs, lr=args.lr,
                              n_header=args.n_header, n_trailer=args.n_trailer, seed=args.seed, heldout=heldout,
                              max_answer_tokens=max_answer, checkpoint=ckpt, checkpoint_every=args.checkpoint_every,
                              resume=args.resume, max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
                              progress=not args.quiet, header_kv=args.header_kv, positions=args.positions,
                              adapters=None if args.init is None else Adapters.load(args.init, model),
                              log=(lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr)))
    ad.save(out, model)
    k = min(16, len(hist["loss"]))
    metrics = {"model": args.model, "data": args.data, "steps": hist["steps"], "resumed_from": hist["resumed_from"],
               "n_train": hist["n_train"], "n_heldout": hist["n_heldout"], "seconds": round(hist["seconds"], 1),
               "stopped_early": hist["stopped_early"],
               "loss_first": sum(hist["loss"][:k]) / max(1, k), "loss_last": sum(hist["loss"][-k:]) / max(1, k),
               "heldout_before": hist["heldout_before"], "heldout_after": hist["heldout_after"],
               "adapters": out, "adapter_id": ad.adapter_id, "checkpoint": ckpt}
    if args.eval_n and _is_testbed_recall(args.model):
        from .bench import compare_on_testbed
        rows = compare_on_testbed(model, tok, ad, n=args.eval_n, context_tokens=args.context_tokens,
                                  methods=["full", "none", "kvpacket"], out=sys.stderr)
        metrics.update({f"accuracy_{r['method']}": r["accuracy"] for r in rows})
    print(json.dumps(metrics), flush=True)
    write_json(args.json, metrics)
    return 0


def _run_eval(args) -> int:
    from .compare import compare_methods, format_table, load_adapters
    from .bench import compare_on_testbed

    methods = args.methods or None
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    needs = any(m == "kvpacket" or m.startswith("kvpacket-") for m in (methods or ALL_METHODS))
    ad = None
    if args.adapters is not None or (needs and _is_testbed_recall(args.model)):
        ad = load_adapters(model, args.adapters)
    elif needs:
        raise SystemExit("scrimp packets eval: kvpacket needs --adapters (train them with `scrimp packets train`)")
    log = open(os.devnull, "w") if args.quiet else sys.stderr
    if args.data is not None:
        prompts = _prompts_from_file(args, tok)
        if args.n:
            prompts = prompts[: args.n]
        rows = compare_methods(model, tok, ad, prompts, methods, max_new_tokens=args.max_new_tokens,
                               progress=not args.quiet, out=log)
    elif _is_testbed_recall(args.model):
        rows = compare_on_testbed(model, tok, ad, n=args.n or 20, context_tokens=args.context_tokens, seed=args.seed,
                                  methods=methods, progress=not args.quiet, out=log)
    else:
        raise SystemExit(f"scrimp packets eval: --data FILE.jsonl is required for --model {args.model}")
    print(format_table(rows))
    write_json(args.json, {"model": args.model, "data": args.data, "adapters": args.adapters, "rows": rows})
    return 0


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help='prompts, one JSON object a line: {"documents": [str, ...], "question": str, "answer": str '
                        f'(optional)}} (default with --model {DEFAULT_MODEL}: the testbed recall task)')
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines of --data with a warning (default: list them all and stop before "
                        "doing anything)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="put the question after the documents as plain text even when the tokenizer has a chat "
                        "template")
    p.add_argument("--context-tokens", type=int, default=RECALL_CONTEXT,
                   help=f"testbed recall prompts only: context length in tokens (default {RECALL_CONTEXT})")


def _build(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="packets_command", metavar="{train,eval}")
    sub.required = True
    t = sub.add_parser("train", help="train header/trailer adapters by self-distillation (base model frozen)",
                       description="Train KV Packet adapters: the student (documents prefilled apart, wrapped in "
                                   "the adapters) learns to match the model itself with full attention.")
    add_model_arguments(t, default=DEFAULT_MODEL)
    _data_options(t)
    t.add_argument("--out", default=None, metavar="ADAPTERS.safetensors",
                   help=f"adapter file to write (required unless --model {DEFAULT_MODEL}, whose default is the "
                        "shipped scrimp/packets/adapters/recall.safetensors)")
    t.add_argument("--steps", type=int, default=None,
                   help="optimizer steps, one prompt each (default: --epochs passes over the training prompts)")
    t.add_argument("--epochs", type=int, default=2, help="passes over the training prompts when --steps is not given")
    t.add_argument("--heldout", type=float, default=None,
                   help="share of --data prompts held out to report KL and first-token agreement on (default 0.1; "
                        "0 for the testbed task)")
    t.add_argument("--max-answer-tokens", type=int, default=32,
                   help="length of the teacher's greedy answer for prompts without an answer (default 32)")
    t.add_argument("--n-train", type=int, default=64, help="testbed recall prompts to train on (default 64)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, decayed linearly to 0 (default 1e-3)")
    t.add_argument("--n-header", type=_non_negative_int, default=8,
                   help="header adapter tokens, >= 0 (default 8, the paper's)")
    t.add_argument("--n-trailer", type=_non_negative_int, default=8,
                   help="trailer adapter tokens, >= 0 (default 8, the paper's)")
    t.add_argument("--header-kv", choices=("every", "once", "none"), default="every",
                   help="where the header's K/V go: in every packet (the paper), one shared copy before the first "
                        "document, or nowhere (build-time context only); the last two assemble and re-rotate fewer tokens")
    t.add_argument("--positions", choices=("overlap", "slots"), default="overlap",
                   help="where inference places the packets: overlap (scrimp's engine default) or slots (every row "
                        "in its own position: the layout vLLM gives packets, scrimp.integrations.vllm)")
    t.add_argument("--init", default=None, metavar="ADAPTERS",
                   help="continue training these adapters (their header/trailer sizes are kept) instead of new ones")
    t.add_argument("--resume", action="store_true",
                   help="continue from the training checkpoint when one exists (same data and settings)")
    t.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="training checkpoint file (default: --out + .train.pt)")
    t.add_argument("--checkpoint-every", type=int, default=50, help="save the training state every N steps (default 50)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    t.add_argument("--eval-n", type=int, default=0,
                   help=f"with --model {DEFAULT_MODEL}: evaluate full / none / kvpacket on this many prompts after training")
    add_common_arguments(t)
    t.set_defaults(func=_run_train)
    e = sub.add_parser("eval", help="accuracy / KL / TTFT / FLOPs of KV Packet and the baselines",
                       description="Compare KV Packet with full recompute, no recompute, CacheBlend and EPIC.")
    add_model_arguments(e, default=DEFAULT_MODEL)
    _data_options(e)
    e.add_argument("--adapters", default=None, metavar="ADAPTERS.safetensors",
                   help=f"adapter file (default with --model {DEFAULT_MODEL}: the shipped one)")
    e.add_argument("--n", type=int, default=None,
                   help="prompts to evaluate (default: all of --data; 20 testbed prompts)")
    e.add_argument("--max-new-tokens", type=int, default=32,
                   help="greedy tokens generated per prompt with an answer (default 32)")
    e.add_argument("--methods", nargs="*", default=None,
                   help=f"subset of: {' '.join(ALL_METHODS)}, cacheblend-<pct>, kvpacket-knorm-<pct>, "
                        "kvpacket-attn-<pct> (default: the first seven)")
    add_common_arguments(e)
    e.set_defaults(func=_run_eval)


register_command("packets", "KV Packet: train adapters, compare with recompute baselines", _build)
