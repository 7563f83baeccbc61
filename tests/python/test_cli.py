"""The ``scrimp`` command line as one grammar: every command and option of the parser tree from
scrimp.cli.build_parser() has help text, every method lists its verbs with one line each, the shared
options mean one thing everywhere, and the top-level commands (`--version`, `testbed eval`) work."""
import argparse
import json
import subprocess
import sys

import pytest

from scrimp import cli
from scrimp.models import DTYPES

PY = sys.executable


def _subparser_actions(p):
    return [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]


def walk(parser, path=("scrimp",)):
    """Yield ``(path, parser)`` for the parser and every sub-parser below it."""
    yield path, parser
    for a in _subparser_actions(parser):
        for name, sp in a.choices.items():
            yield from walk(sp, path + (name,))


def options(parser):
    """The parser's own arguments (help and version actions excluded)."""
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))]


@pytest.fixture(scope="module")
def parser():
    return cli.build_parser()


def _missing_help(parser, command):
    missing = []
    for path, p in walk(parser):
        if len(path) < 2 or path[1] != command:
            continue
        for a in options(p):
            if not a.help or a.help == argparse.SUPPRESS or not a.help.strip():
                missing.append(f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}")
        for sa in _subparser_actions(p):
            helped = {c.dest for c in sa._choices_actions if c.help}
            missing += [f"{' '.join(path)} {verb} (verb without a help line)" for verb in sa.choices
                        if verb not in helped]
    return missing


def test_top_level_commands(parser):
    top = _subparser_actions(parser)[0]
    assert {"demo", "testbed", "tip", "tessy", "packets", "icecache"} <= set(top.choices)
    for c in top._choices_actions:
        assert c.help and c.help.strip(), f"scrimp {c.dest} has no help line"


@pytest.mark.parametrize("command", ["demo", "testbed", "tip", "tessy", "packets", "icecache"])
def test_every_option_and_verb_has_help(parser, command):
    assert _missing_help(parser, command) == []


def test_no_top_level_distill(parser):
    # distillation is `scrimp tip distill`
    top = _subparser_actions(parser)[0]
    assert "distill" not in top.choices
    tip = top.choices["tip"]
    assert "distill" in _subparser_actions(tip)[0].choices


def test_quiet_is_the_only_progress_switch(parser):
    # `--quiet` means no progress bars everywhere
    offenders = [f"{' '.join(path)} {s}" for path, p in walk(parser) for a in options(p) for s in a.option_strings
                 if s in ("--no-progress", "--progress", "--silent")]
    assert offenders == []


def test_shared_options_have_one_meaning(parser):
    for path, p in walk(parser):
        where = " ".join(path)
        for a in options(p):
            names = set(a.option_strings)
            if "--json" in names:
                assert a.nargs is None and a.const is None and a.metavar == "PATH", f"{where}: --json must take PATH"
            if "--quiet" in names:
                assert isinstance(a, argparse._StoreTrueAction), f"{where}: --quiet must be a flag"
            if "--seed" in names:
                assert a.type is int, f"{where}: --seed must be an int"
            if "--device" in names:
                assert a.default == "auto", f"{where}: --device must come from scrimp.models.add_model_arguments"
            if "--dtype" in names:
                assert list(a.choices) == list(DTYPES), f"{where}: --dtype must come from add_model_arguments"
            if names & {"--model", "--student", "--teacher"}:
                assert "testbed:NAME" in (a.help or ""), f"{where}: {a.option_strings} must be a model SPEC"


def test_method_help_lists_verbs_one_line_each(parser):
    top = _subparser_actions(parser)[0]
    for name in ("testbed", "tip", "tessy", "packets", "icecache"):
        sp = top.choices[name]
        subs = _subparser_actions(sp)
        assert subs, f"scrimp {name} has no verbs"
        text = sp.format_help()
        for c in subs[0]._choices_actions:
            assert c.dest in text
            if c.help:
                assert c.help.split()[0] in text


def test_version():
    import scrimp

    r = subprocess.run([PY, "-m", "scrimp.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    assert r.stdout.strip() == f"scrimp {scrimp.__version__}"


def test_testbed_eval_writes_json(tmp_path):
    out = tmp_path / "tb.json"
    r = subprocess.run([PY, "-m", "scrimp.cli", "testbed", "eval", "--n", "2", "--models", "arith-teacher",
                        "--quiet", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["n"] == 2 and len(rep["rows"]) == 1
    row = rep["rows"][0]
    assert row["model"] == "arith-teacher" and 0.0 <= row["accuracy"] <= 1.0
    assert "arith-teacher" in r.stdout and "%" in r.stdout


def test_bad_input_is_refused(parser, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--sections", "nonsense"])
    with pytest.raises(SystemExit):
        parser.parse_args(["testbed", "eval", "--dtype", "int8"])
    with pytest.raises(SystemExit):
        cli.main(["testbed", "eval", "--models", "no-such-model", "--n", "1"])
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="help"):
        cli.register_command("x", "", lambda p: None)
    with pytest.raises(ValueError, match="invalid command name"):
        cli.register_command("two words", "help", lambda p: None)
    with pytest.raises(TypeError, match="callable"):
        cli.register_command("x", "help", None)
