"""Replays every fuzz corpus and regression input (fuzz/corpus/<target>, fuzz/regressions/<target>) through
the Python fuzz targets: each must be accepted or rejected with a documented error, never crash. The
same inputs are run for minutes under atheris by tests/hardening.sh; this replay keeps every input that
was ever interesting (and every finding) checked on each test run without the fuzzer."""
import glob
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "fuzz")
sys.path.insert(0, ROOT)
import python_targets  # noqa: E402

CASES = [(t, f) for t in python_targets.TARGETS
         for f in sorted(glob.glob(os.path.join(ROOT, "corpus", t, "*")) + glob.glob(os.path.join(ROOT, "regressions", t, "*")))]


def test_every_target_has_a_corpus():
    for t in python_targets.TARGETS:
        assert glob.glob(os.path.join(ROOT, "corpus", t, "*")), f"fuzz/corpus/{t} is empty"


@pytest.mark.parametrize("target,path", CASES, ids=[f"{t}:{os.path.basename(f)}" for t, f in CASES])
def test_replay(target, path):
    with open(path, "rb") as f:
        python_targets.TARGETS[target](f.read())


@pytest.mark.parametrize("target", sorted(python_targets.TARGETS))
def test_mutations_of_the_seeds(target):
    """Deterministic byte flips, truncations and extensions of each seed (a cheap stand-in for the
    fuzzer on every run)."""
    import random
    rng = random.Random(0)
    seeds = sorted(glob.glob(os.path.join(ROOT, "corpus", target, "seed-*")))
    for path in seeds:
        data = open(path, "rb").read()
        for _ in range(60):
            b = bytearray(data)
            op = rng.randrange(3)
            if op == 0 and b:
                for _ in range(rng.randint(1, 4)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
            elif op == 1:
                b = b[:rng.randrange(len(b) + 1)]
            else:
                b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            python_targets.TARGETS[target](bytes(b))
