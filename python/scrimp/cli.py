"""The ``scrimp`` command line.

Subcommands are registered in :data:`COMMANDS` (name -> (help, builder)); a
builder receives its ``argparse`` subparser, adds its arguments and sets
``func=callable(args) -> int`` with ``parser.set_defaults``. Other modules add
their own subcommands with :func:`register_command`, e.g.::

    from scrimp.cli import register_command

    def _build(p):
        p.add_argument("--steps", type=int, default=10)
        p.set_defaults(func=lambda args: run_distill(args.steps) or 0)

    register_command("distill", "on-policy distillation with TIP token selection", _build)

Modules listed in :data:`PLUGIN_MODULES` are imported before parsing so that
their ``register_command`` calls take effect (missing ones are skipped).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

#: name -> (one-line help, builder(subparser))
COMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}

#: modules imported (if present) before the parser is built; they may call register_command
PLUGIN_MODULES: List[str] = ["scrimp.tip.cli", "scrimp.tessy.cli", "scrimp.packets.cli", "scrimp.icecache.cli"]


def register_command(name: str, help: str, builder: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add (or replace) the subcommand ``name``."""
    if not isinstance(name, str) or not name or " " in name:
        raise ValueError(f"invalid command name {name!r}")
    if not callable(builder):
        raise TypeError("builder must be callable(parser)")
    COMMANDS[name] = (help, builder)


def command(name: str, help: str):
    """Decorator form of :func:`register_command`."""
    def deco(builder):
        register_command(name, help, builder)
        return builder
    return deco


# ----------------------------------------------------------------------------- shared options

def add_common_arguments(p: argparse.ArgumentParser, json: bool = True, quiet: bool = True,
                         seed: Optional[int] = 0) -> None:
    """The options every command shares, with one meaning each: ``--json PATH``, ``--quiet``, ``--seed``.

    Model options come from :func:`scrimp.models.add_model_arguments` (``--model/--student/--teacher``,
    ``--device``, ``--dtype``).
    """
    if json:
        p.add_argument("--json", metavar="PATH", default=None,
                       help="also write every reported number to this JSON file")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed, help=f"random seed (default {seed})")


def write_json(path: Optional[str], obj) -> None:
    """Write ``obj`` as JSON to ``path`` (nothing when ``path`` is None), via a temporary file."""
    if not path:
        return
    import json as _json
    import os

    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        _json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- testbed

def _fmt_acc(x) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def testbed_eval_rows(n: int = 50, recall_lengths=(512, 2048), seed: int = 0, out=None) -> list:
    """Evaluate the shipped testbed models and print (to ``out``) an accuracy table.

    Returns rows ``{"model", "task", "setting", "n", "accuracy", "recorded"}``.
    """
    from . import testbed

    out = out or sys.stdout
    rows = []
    hdr = f"{'model':<15} {'task':<7} {'setting':<22} {'n':>4} {'accuracy':>9} {'recorded':>9} {'time':>6}"
    print(hdr, file=out)
    print("-" * len(hdr), file=out, flush=True)
    for name, (_, task, style) in testbed.MODELS.items():
        model, tok = testbed.load(name)
        try:
            recorded = testbed.shipped_metrics(name)
        except OSError:
            recorded = {}
        settings = ([(f"context {L} tokens", dict(context_tokens=L), f"accuracy@{L}") for L in recall_lengths]
                    if task == "recall" else [(f"{style} style", dict(style=style), "accuracy")])
        for label, kw, key in settings:
            t0 = time.time()
            res = testbed.evaluate(model, tok, task, n=n, seed=seed, **kw)
            row = {"model": name, "task": task, "setting": label, "n": n,
                   "accuracy": res["accuracy"], "recorded": recorded.get(key)}
            rows.append(row)
            print(f"{name:<15} {task:<7} {label:<22} {n:>4} {_fmt_acc(row['accuracy']):>9} "
                  f"{_fmt_acc(row['recorded']):>9} {time.time() - t0:5.1f}s", file=out, flush=True)
    return rows


def _build_testbed(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="testbed_command", metavar="{eval,train}")
    sub.required = True
    pe = sub.add_parser("eval", help="accuracy table of the shipped testbed models")
    pe.add_argument("--n", type=int, default=50, help="examples per row (default 50)")
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--lengths", type=int, nargs="+", default=[512, 2048],
                    help="recall context lengths in tokens (default 512 2048)")

    def run_eval(args):
        if args.n < 1:
            p.error("--n must be >= 1")
        testbed_eval_rows(n=args.n, recall_lengths=tuple(args.lengths), seed=args.seed)
        return 0

    pe.set_defaults(func=run_eval)

    from .testbed import train as _train

    pt = sub.add_parser("train", help="train a testbed model (same as python -m scrimp.testbed.train)")
    _train.build_parser(pt)
    pt.set_defaults(func=lambda args: (_train.run_from_args(args), 0)[1])


#: (title, package with demo_section(quick) -> str), run in order after the testbed and scoring rows
DEMO_SECTIONS = [
    ("TIP: token-selective on-policy distillation", "scrimp.tip"),
    ("TESSY: teacher-student cooperative synthesis", "scrimp.tessy"),
    ("KV Packet: recomputation-free packets vs recompute", "scrimp.packets"),
    ("IceCache: clustered KV pages offloaded to host memory, within a token budget", "scrimp.icecache"),
]


def _build_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer examples (well under a minute)")
    p.add_argument("--n", type=int, default=None, help="examples per testbed row (default 20, --quick 10)")

    def run_demo(args):
        n = args.n or (10 if args.quick else 20)
        print(f"== scrimp testbed: shipped models, greedy exact match, n={n} per row ==", flush=True)
        testbed_eval_rows(n=n)
        print("", flush=True)
        print("== scrimp token scoring ==", flush=True)
        from .benchmarks import scoring_report

        print(scoring_report(quick=True), flush=True)
        for title, module in DEMO_SECTIONS:
            print(f"\n== {title} ==", flush=True)
            print(importlib.import_module(module).demo_section(quick=args.quick), flush=True)
        return 0

    p.set_defaults(func=run_demo)


register_command("testbed", "evaluate or train the testbed models", _build_testbed)
register_command("demo", "run the testbed evaluation and the scoring benchmark", _build_demo)


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    for mod in PLUGIN_MODULES:
        importlib.import_module(mod)  # a broken plugin is a bug to surface, not to hide
    parser = argparse.ArgumentParser(prog="scrimp", description="scrimp: cheaper LLM pipelines")
    try:
        from . import __version__ as version
    except ImportError:  # pragma: no cover
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"scrimp {version}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True
    for name, (help_, builder) in COMMANDS.items():
        builder(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``scrimp`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
