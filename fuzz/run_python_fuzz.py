#!/usr/bin/env python
"""Run one Python fuzz target (python_targets.TARGETS) under atheris for a bounded time.

    python fuzz/run_python_fuzz.py tessy_jsonl --seconds 60

The corpus is fuzz/corpus/<target>/ (kept in the repo; new interesting inputs are written to a scratch
copy, not back into the repo). A finding is written as crash-* into --artifacts and the run exits
non-zero; add it to fuzz/regressions/<target>/ so tests/python/test_fuzz_corpus.py replays it forever.
"""
import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("--seconds", type=int, default=60)
    p.add_argument("--artifacts", default=".")
    a = p.parse_args()
    import atheris

    with atheris.instrument_imports(include=["scrimp", "python_targets", "safetensors", "json"]):
        sys.path.insert(0, HERE)
        import python_targets
        import scrimp.packets.method  # noqa: F401  (instrumented)
        import scrimp.tessy.output  # noqa: F401
    target = python_targets.TARGETS[a.target]
    corpus = tempfile.mkdtemp(prefix=f"corpus-{a.target}-")
    for name in os.listdir(os.path.join(HERE, "corpus", a.target)):
        shutil.copy(os.path.join(HERE, "corpus", a.target, name), corpus)
    os.makedirs(a.artifacts, exist_ok=True)
    atheris.Setup([sys.argv[0], corpus, f"-max_total_time={a.seconds}", "-rss_limit_mb=4096",
                   f"-artifact_prefix={os.path.join(a.artifacts, a.target)}-", "-print_final_stats=1"],
                  target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
