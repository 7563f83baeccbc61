"""The ``scrimp`` command line: one grammar, ``scrimp <method> <verb> [options]``.

Top-level commands: ``scrimp demo`` (the report of every method on the testbed), ``scrimp testbed
eval|train``, and one command per method (``scrimp tip``, ``scrimp tessy``, ``scrimp packets``,
``scrimp icecache``) whose verbs each method registers from its own ``cli.py``.

Subcommands are registered in :data:`COMMANDS` (name -> (help, builder)); a builder receives its
``argparse`` subparser, adds its arguments (or verbs) and sets ``func=callable(args) -> int`` with
``parser.set_defaults``. A method adds its command with :func:`register_command`, e.g.::

    from scrimp.cli import add_common_arguments, register_command

    def _build(p):
        verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
        run = verbs.add_parser("run", help="run it once", description="run it once")
        run.add_argument("--steps", type=int, default=10, help="optimizer steps (default 10)")
        add_common_arguments(run)                       # --json PATH, --quiet, --seed
        run.set_defaults(func=lambda args: 0)

    register_command("mymethod", "what my method does, in one line", _build)

Shared options have one meaning each: ``--model/--student/--teacher SPEC``, ``--device`` and
``--dtype`` (:func:`scrimp.models.add_model_arguments`); ``--json PATH``, ``--quiet`` (no progress
bars) and ``--seed`` (:func:`add_common_arguments`). Modules listed in :data:`PLUGIN_MODULES` are
imported before parsing so that their ``register_command`` calls take effect.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Dict, List, Optional, Tuple

#: name -> (one-line help, builder(subparser))
COMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}

#: modules imported before the parser is built; they call register_command
PLUGIN_MODULES: List[str] = ["scrimp.tip.cli", "scrimp.tessy.cli", "scrimp.packets.cli", "scrimp.icecache.cli"]


def register_command(name: str, help: str, builder: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add (or replace) the top-level command ``name`` with its one-line ``help``."""
    if not isinstance(name, str) or not name or " " in name:
        raise ValueError(f"invalid command name {name!r}")
    if not isinstance(help, str) or not help.strip():
        raise ValueError(f"command {name!r} needs a one-line help text")
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


def quiet_libraries() -> None:
    """Silence the model-loading progress bars of transformers (scrimp's own bars follow ``--quiet``)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


# ----------------------------------------------------------------------------- testbed

def _build_testbed(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="testbed_command", metavar="VERB")
    sub.required = True
    help_eval = "accuracy table of the shipped testbed models against their recorded accuracy"
    pe = sub.add_parser("eval", help=help_eval, description=help_eval)
    pe.add_argument("--n", type=int, default=50, help="examples per row (default 50)")
    pe.add_argument("--lengths", type=int, nargs="+", default=[512, 2048],
                    help="recall context lengths in tokens (default 512 2048)")
    pe.add_argument("--filler-share", type=float, default=0.0,
                    help="share of each recall context given to filler lines (default 0; recall-8k is "
                         "measured at 0.5 up to 8,192 tokens)")
    pe.add_argument("--models", nargs="+", default=None, metavar="NAME",
                    help="shipped testbed models to evaluate (default: all of scrimp.testbed.MODELS)")
    from .models import add_device_dtype_arguments

    add_device_dtype_arguments(pe)
    add_common_arguments(pe)

    def run_eval(args):
        from .testbed.demo import eval_rows

        if args.n < 1:
            pe.error("--n must be >= 1")
        if args.quiet:
            quiet_libraries()
        try:
            rows = eval_rows(n=args.n, recall_lengths=tuple(args.lengths), seed=args.seed, models=args.models,
                             device=args.device, dtype=args.dtype, progress=not args.quiet, out=sys.stdout,
                             filler_share=args.filler_share)
        except ValueError as e:
            pe.error(str(e))
        write_json(args.json, {"command": "scrimp testbed eval", "n": args.n, "seed": args.seed,
                               "filler_share": args.filler_share, "rows": rows})
        return 0

    pe.set_defaults(func=run_eval)

    from .testbed import train as _train

    help_train = "train a testbed model from its recipe (same as python -m scrimp.testbed.train)"
    pt = sub.add_parser("train", help=help_train, description=help_train)
    _train.build_parser(pt)
    pt.set_defaults(func=lambda args: (_train.run_from_args(args), 0)[1])


def _build_demo(p: argparse.ArgumentParser) -> None:
    from . import report

    p.add_argument("--quick", action="store_true",
                   help="fewer examples and settings per section (a few minutes on 2 CPU cores); noisy: wide "
                        "95%% intervals, method differences mostly not resolved")
    p.add_argument("--n", type=int, default=None,
                   help="examples per accuracy measurement (default: each section's, sized to the docs' "
                        "reporting sets; smaller with --quick)")
    p.add_argument("--sections", nargs="+", default=None, choices=list(report.SECTIONS), metavar="SECTION",
                   help=f"run only these sections (default all: {' '.join(report.SECTIONS)})")
    p.add_argument("--html", metavar="PATH", default=None,
                   help="also write the report as one self-contained HTML page (plots embedded)")
    add_common_arguments(p, seed=None)

    def run_demo(args):
        if args.n is not None and args.n < 1:
            p.error("--n must be >= 1")
        if args.html:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                p.error("--html needs matplotlib: pip install 'scrimp[report]' (or pip install matplotlib)")
        quiet_libraries()
        rep = report.build_report(quick=args.quick, sections=args.sections, n=args.n, progress=not args.quiet)
        print(report.render_text(rep), flush=True)
        write_json(args.json, rep)
        if args.html:
            report.write_html(args.html, rep)
        failed = report.failed_sections(rep)
        if failed:
            print(f"scrimp demo: sections failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0

    p.set_defaults(func=run_demo)


register_command("demo", "every method on the testbed: summary table, sections, optional JSON and HTML report",
                 _build_demo)
register_command("testbed", "evaluate or train the shipped testbed models", _build_testbed)


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    """The whole ``scrimp`` parser, with every registered command."""
    for mod in PLUGIN_MODULES:
        importlib.import_module(mod)  # a broken plugin is a bug to surface, not to hide
    parser = argparse.ArgumentParser(prog="scrimp", description="scrimp: cheaper LLM pipelines without making "
                                     "them worse. Commands follow `scrimp <method> <verb>`; "
                                     "`scrimp <command> --help` lists its verbs and options.")
    try:
        from . import __version__ as version
    except ImportError:  # pragma: no cover
        version = "unknown"
    parser.add_argument("--version", action="version", version=f"scrimp {version}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    # `python -m scrimp.cli`: run the imported module's main, whose COMMANDS the plugins register into
    from scrimp.cli import main as _main

    sys.exit(_main())
