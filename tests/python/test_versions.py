"""The version ranges: pyproject.toml agrees with scrimp._versions, an installed version outside them is
refused by name at import, and no short run of a method triggers a transformers deprecation (a
FutureWarning / DeprecationWarning raised from transformers code, or a logged "deprecated" message)."""
import contextlib
import logging
import os
import subprocess
import sys
import warnings

import pytest

from scrimp import _versions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------- the ranges

def _pyproject():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _declared(requirements, name):
    import re

    for r in requirements:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(\[[^\]]*\])?\s*([^;]*)", r)
        if m and m.group(1).lower() == name:
            return m.group(3).replace(" ", "")
    raise AssertionError(f"{name} is not declared")


def test_pyproject_declares_the_checked_ranges():
    p = _pyproject()["project"]
    assert p["requires-python"].replace(" ", "") == _versions.specifier("python")
    for name in ("torch", "transformers"):
        assert _declared(p["dependencies"], name) == _versions.specifier(name), name
    assert _declared(p["optional-dependencies"]["test"], "trl") == _versions.specifier("trl")
    assert _declared(p["optional-dependencies"]["trl"], "trl") == _versions.specifier("trl")


def test_the_running_versions_are_admitted():
    for name in ("python", "torch", "transformers"):
        _versions.require(name)  # this environment is one CI tests


@pytest.mark.parametrize("name,version,ok", [
    ("torch", "2.13.0+cpu", True), ("torch", "2.13.1", True), ("torch", "2.12.1", False),
    ("torch", "2.14.0", False), ("torch", "2.14.0.dev20261201", False),
    ("transformers", "5.16.1", True), ("transformers", "5.19.0", True), ("transformers", "5.25.0", True),
    ("transformers", "5.16.0", False), ("transformers", "5.2.0", False), ("transformers", "5.26.0.dev0", False),
    ("trl", "1.16.0", True), ("trl", "1.15.0", False), ("trl", "1.17.0", False),
    ("python", "3.11.7", True), ("python", "3.10.14", False), ("python", "3.12.0", False),
])
def test_outside_the_range_is_refused_naming_both_versions(monkeypatch, name, version, ok):
    monkeypatch.delenv(_versions.ALLOW_ENV, raising=False)
    monkeypatch.setattr(_versions, "installed_version", lambda n: version if n == name else None)
    if ok:
        assert _versions.require(name) == version
        return
    with pytest.raises(_versions.VersionError) as e:
        _versions.require(name)
    msg = str(e.value)
    assert version in msg and _versions.specifier(name) in msg, msg
    monkeypatch.setenv(_versions.ALLOW_ENV, "1")
    assert _versions.require(name) == version


def test_not_installed_is_left_to_the_import_that_needs_it(monkeypatch):
    monkeypatch.setattr(_versions, "installed_version", lambda n: None)
    assert _versions.require("trl") is None


_FAKE = ("import importlib.metadata as m, sys\n"
         "real = m.version\n"
         "m.version = lambda n: {fake!r} if n == {name!r} else real(n)\n"
         "try:\n"
         "    {stmt}\n"
         "except ImportError as e:\n"
         "    print(type(e).__name__, e)\n"
         "    sys.exit(3)\n")


@pytest.mark.parametrize("name,fake,stmt", [
    ("transformers", "5.2.0", "import scrimp"),
    ("torch", "2.4.1", "import scrimp"),
    ("trl", "0.29.1", "import scrimp.tip.trl_hook"),
])
def test_import_names_the_installed_and_required_version(name, fake, stmt):
    env = {k: v for k, v in os.environ.items() if k != _versions.ALLOW_ENV}
    r = subprocess.run([sys.executable, "-c", _FAKE.format(fake=fake, name=name, stmt=stmt)], cwd="/",
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.startswith("VersionError"), r.stdout
    assert fake in r.stdout and _versions.specifier(name) in r.stdout, r.stdout


# ----------------------------------------------------------------------------- no transformers deprecations

class _Deprecation(Exception):
    pass


@contextlib.contextmanager
def transformers_deprecations_are_errors():
    """FutureWarning / DeprecationWarning issued by transformers code (whatever its stacklevel points
    at) that the warning filters in force would show raise; a transformers log record saying
    "deprecated" fails the block at its end."""
    import transformers  # noqa: F401
    from transformers.utils import logging as tlog

    real_warn = warnings.warn

    def warn(message, category=None, stacklevel=1, source=None, **kw):
        cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if issubclass(cat, (FutureWarning, DeprecationWarning)) and caller.split(".")[0] == "transformers":
            with warnings.catch_warnings(record=True) as shown:  # the filters in force decide (scrimp may
                real_warn(message, category, stacklevel + 1, source, **kw)  # silence a caller's deprecation)
            if shown:
                raise _Deprecation(f"{cat.__name__} from {caller}: {message}")
            return None
        return real_warn(message, category, stacklevel + 1, source, **kw)

    records = []

    class Handler(logging.Handler):
        def emit(self, record):
            if "deprecat" in record.getMessage().lower():
                records.append(f"{record.name}: {record.getMessage()}")

    once = getattr(logging.Logger.warning_once, "cache_clear", None)
    if once:
        once()  # messages logged once per process earlier must show again here
    h = Handler(level=logging.WARNING)
    tlog.get_logger("transformers").addHandler(h)
    warnings.warn = warn
    try:
        yield
    finally:
        warnings.warn = real_warn
        tlog.get_logger("transformers").removeHandler(h)
    assert not records, records


def test_the_guard_catches_what_transformers_deprecates():
    from transformers.utils import logging as tlog

    with pytest.raises(_Deprecation):
        with transformers_deprecations_are_errors():
            g = {"__name__": "transformers.fake", "warnings": warnings}
            exec("warnings.warn('x is deprecated', FutureWarning, stacklevel=2)", g)
    with pytest.raises(AssertionError, match="deprecated"):
        with transformers_deprecations_are_errors():
            tlog.get_logger("transformers.fake").warning_once("`x` is deprecated. Use `y` instead.")


def test_packets_eval_has_no_deprecation(capsys):
    from scrimp.cli import main

    with transformers_deprecations_are_errors():
        rc = main(["packets", "eval", "--n", "1", "--context-tokens", "256", "--max-new-tokens", "2",
                   "--methods", "full", "kvpacket", "cacheblend-10", "epic", "--quiet"])
    assert rc in (0, None)
    assert "deprecated" not in capsys.readouterr().err


def test_icecache_generate_has_no_deprecation():
    import torch

    import scrimp
    from scrimp.testbed import tasks

    model, tok = scrimp.load_model("testbed:recall", device="cpu")
    ex = tasks.recall(seed=0, context_tokens=256, tokenizer=tok)
    ids = torch.tensor([ex.prompt_ids])
    with transformers_deprecations_are_errors():
        cache = scrimp.IceCache(model.config, budget=64, dense_layers=0)
        out = scrimp.icecache.generate(model, ids, cache, max_new_tokens=4, do_sample=False)
    assert out.shape[-1] >= ids.shape[-1] + 1


def test_tip_trl_step_has_no_deprecation(tmp_path):
    pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hf_models import corpus, make_checkpoint

    s = make_checkpoint("qwen2", tmp_path, name="student")
    t = make_checkpoint("llama3", tmp_path, name="teacher", seed=1, hidden_size=96, intermediate_size=192,
                        pad_vocab_to=513)
    AutoTokenizer.from_pretrained(s).save_pretrained(t)
    lines = corpus(8, seed=5)
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": lines[2 * i]},
                                          {"role": "assistant", "content": lines[2 * i + 1]}]} for i in range(4)])
    torch.manual_seed(0)
    with transformers_deprecations_are_errors():
        from scrimp.tip.trl_hook import TipGKDTrainer, gkd_config

        args = gkd_config(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, lmbda=1.0,
                          beta=0.5, max_new_tokens=4, temperature=1.0, report_to="none", use_cpu=True,
                          save_strategy="no", logging_steps=1, learning_rate=1e-3, disable_tqdm=True, max_length=64,
                          seed=0)
        tr = TipGKDTrainer(model=AutoModelForCausalLM.from_pretrained(s),
                           teacher_model=AutoModelForCausalLM.from_pretrained(t), args=args, train_dataset=ds,
                           processing_class=AutoTokenizer.from_pretrained(s), tip_rule="soft_or", tip_ratio=0.5)
        tr.train()  # an on-policy rollout (lmbda=1) and one optimizer step through TRL's machinery
    assert tr.state.global_step == 1
    assert tr.args.gradient_checkpointing  # TRL's default is kept, under whichever name transformers reads
