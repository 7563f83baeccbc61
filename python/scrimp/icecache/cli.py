"""`scrimp icecache`: IceCache demo section and benchmark tables from the command line."""
from __future__ import annotations

import argparse

from scrimp.cli import register_command


def _build(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="icecache_cmd", required=True)
    d = sub.add_parser("demo", help="accuracy and device memory vs full KV at budget 256 on the testbed")
    d.add_argument("--full", action="store_true", help="more examples (slower)")
    b = sub.add_parser("bench", help="the bench/bench_icecache.py tables")
    b.add_argument("--n", type=int, default=30)
    b.add_argument("--context", type=int, default=2048)
    b.add_argument("--json", default=None)

    def run(args):
        if args.icecache_cmd == "demo":
            from . import demo_section

            print(demo_section(quick=not args.full))
        else:
            from .bench import main

            argv = ["--n", str(args.n), "--context", str(args.context)]
            if args.json:
                argv += ["--json", args.json]
            main(argv)
        return 0

    p.set_defaults(func=run)


register_command("icecache", "IceCache: clustered offloaded KV cache (demo, bench)", _build)
