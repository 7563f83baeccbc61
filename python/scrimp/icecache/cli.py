"""`scrimp icecache`: eval (accuracy and device KV memory on a JSONL or the testbed recall task),
bench (the testbed tables of bench/bench_icecache.py) and demo (the demo section)."""
from __future__ import annotations

import argparse

from scrimp.cli import add_common_arguments, register_command, write_json
from scrimp.models import add_model_arguments

from .options import DEFAULT_SUMMARY_ROWS

DEFAULT_MODEL = "testbed:recall"


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 256],
                   help="IceCache token budgets per layer and KV head (default 64 256)")
    p.add_argument("--page-size", type=int, default=8, help="tokens per page (default 8)")
    p.add_argument("--sink-pages", type=int, default=1, help="resident sink pages (default 1)")
    p.add_argument("--window-pages", type=int, default=1, help="resident recent-window pages (default 1)")
    p.add_argument("--dense-layers", type=int, default=2, help="first layers kept dense (default 2)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prefill the prompt this many tokens at a time (default: one pass)")
    p.add_argument("--summaries", action=argparse.BooleanOptionalAction, default=True,
                   help="page summaries for unselected pages (scrimp's extension; default on, --no-summaries: off)")
    p.add_argument("--summary-mass", choices=["exact", "mean"], default="exact",
                   help="how much attention a summary row takes: 'exact' (its pages' true mass, scored on the "
                        "host every step; default) or 'mean' (mean key + log count, no host scan)")
    p.add_argument("--summary-rows", type=int, default=DEFAULT_SUMMARY_ROWS,
                   help=f"most summary rows per layer and KV head (default {DEFAULT_SUMMARY_ROWS}): one per page up "
                        "to that many pages, then rows for groups of neighbouring pages")
    p.add_argument("--rerank", type=int, default=8,
                   help="re-score N bound candidates per selected page by their exact max q.k (default 8; 0 = off)")
    p.add_argument("--paper", action="store_true",
                   help="the IceCache paper's configuration: 16-token pages, sink 2 + window 2 pages, no summaries, "
                        "no rerank (overrides those options; --dense-layers still applies)")


def _testbed_examples(tokenizer, n: int, context: int, seed: int) -> list:
    from scrimp import testbed

    exs = [testbed.tasks.recall(seed=seed * 1_000_003 + i, context_tokens=context, tokenizer=tokenizer)
           for i in range(n)]
    return [{"prompt": list(ex.prompt_ids), "answer": ex.answer} for ex in exs]


def run_eval(args) -> int:
    import torch

    from scrimp.models import load_model

    from .evaluate import evaluate, format_rows, load_jsonl

    examples = load_jsonl(args.data) if args.data else None  # bad lines stop here, before any model runs
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, attn_implementation="sdpa")
    if examples is None:
        examples = _testbed_examples(tok, args.n, args.context, args.seed)
        source = f"testbed recall task, {args.n} prompts of ~{args.context} tokens (seed {args.seed})"
    else:
        examples = examples[:args.n] if args.n else examples
        source = f"{args.data} ({len(examples)} examples)"
    if args.paper:
        from .cache import PAPER

        for key in ("page_size", "sink_pages", "window_pages", "summaries", "rerank"):
            setattr(args, key, PAPER[key])
    geo = dict(page_size=args.page_size, sink_pages=args.sink_pages, window_pages=args.window_pages,
               dense_layers=args.dense_layers, prefill_chunk=args.prefill_chunk, summaries=args.summaries,
               summary_mass=args.summary_mass if args.summaries else None, summary_rows=args.summary_rows,
               rerank=args.rerank)
    res = evaluate(model, tok, examples, budgets=args.budgets, max_new_tokens=args.max_new_tokens,
                   progress=not args.quiet, **geo)
    print(f"IceCache eval: {args.model} on {source}; prompts {res['prompt_tokens']['mean']:.0f} tokens on average; "
          f"page {args.page_size}, sink {args.sink_pages} + window {args.window_pages} pages, "
          f"dense layers {args.dense_layers}, "
          f"summaries {args.summary_mass + ' masses, ' + str(args.summary_rows) + ' rows' if args.summaries else 'off'}, "
          f"rerank {args.rerank or 'off'}, prefill chunk {args.prefill_chunk or 'none'}")
    print(format_rows(res))
    write_json(args.json, {"model": args.model, "data": args.data, "source": source, "seed": args.seed,
                           "settings": geo, "budgets": args.budgets, **{k: res[k] for k in ("rows", "prompt_tokens")}})
    return 0


def _build(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="icecache_cmd", required=True)
    e = sub.add_parser("eval", help="accuracy and device KV memory of full cache vs IceCache at given budgets")
    add_model_arguments(e, default=DEFAULT_MODEL)
    e.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help='one {"prompt": str, "answer": str} per line (default: the testbed recall task)')
    e.add_argument("--n", type=int, default=None,
                   help="examples: the first N lines of --data, or N testbed prompts (default: all lines / 30)")
    e.add_argument("--context", type=int, default=2048, help="testbed recall prompt length in tokens (default 2048)")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per prompt (default: the answer's token count + 1)")
    _cache_arguments(e)
    add_common_arguments(e)
    e.set_defaults(func=_run_eval_checked(e))

    b = sub.add_parser("bench", help="the bench/bench_icecache.py tables on the testbed recall model")
    b.add_argument("--n", type=int, default=30, help="recall prompts per row (default 30)")
    b.add_argument("--context", type=int, default=2048, help="recall prompt length in tokens (default 2048)")
    b.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512], help="budgets of the accuracy table")
    add_common_arguments(b, quiet=False, seed=None)

    def run_bench(args):
        from .bench import main

        argv = ["--n", str(args.n), "--context", str(args.context), "--budgets", *map(str, args.budgets)]
        if args.json:
            argv += ["--json", args.json]
        main(argv)
        return 0

    b.set_defaults(func=run_bench)

    d = sub.add_parser("demo", help="accuracy and device memory vs full KV at budget 256 on the testbed")
    d.add_argument("--quick", action="store_true", help="fewer examples (12 instead of 50)")

    def run_demo(args):
        from . import demo_section

        print(demo_section(quick=args.quick))
        return 0

    d.set_defaults(func=run_demo)


def _run_eval_checked(parser):
    def run(args):
        if args.n is not None and args.n < 1:
            parser.error("--n must be >= 1")
        if args.data is None and args.n is None:
            args.n = 30
        try:
            return run_eval(args)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))

    return run


register_command("icecache", "IceCache: clustered offloaded KV cache (eval, bench, demo)", _build)
