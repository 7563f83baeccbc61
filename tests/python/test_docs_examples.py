"""Every ```python code block in README.md and docs/*.md runs, so an example cannot drift from the API.

Convention for the docs:
- The ```python blocks of one file run in order in one namespace (a later block may use the names an
  earlier one defined), in a temporary working directory, on the CPU, with small shapes (testbed or
  random-weight models).
- A block that needs a GPU is marked by the line `<!-- gpu -->` right before its opening fence; it
  is skipped when CUDA is not usable (and runs where it is). No other block may be skipped.
- Code that is not meant to run (signatures, shell commands, output) uses another fence (```text,
  ```bash, or an indented block).
Also checked: every `scrimp <command> [<verb>]` these files name exists in scrimp.cli.build_parser(), and
no doc, benchmark, test or source file narrates development history (numbered sessions and the like).
"""
import argparse
import os
import re

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
DOC_FILES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                                   if f.endswith(".md"))
FENCE = re.compile(r"^(?P<marker><!-- gpu -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M)


def python_blocks(path):
    """``[(line, code, needs_gpu)]`` of the ```python blocks in ``path``."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("code"), bool(m.group("marker")))
            for m in FENCE.finditer(text)]


@pytest.mark.parametrize("path", DOC_FILES)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path} has no python blocks")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_example_{os.path.basename(path)}"}
    skipped = []
    for line, code, needs_gpu in blocks:
        if needs_gpu and not torch.cuda.is_available():
            skipped.append(line)
            continue
        exec(compile(code, f"{path}, block at line {line}", "exec"), namespace)
    if skipped and len(skipped) == len(blocks):
        pytest.skip(f"{path}: every block needs a GPU (lines {skipped})")


@pytest.mark.parametrize("path", DOC_FILES)
def test_named_commands_exist(path):
    """Every `scrimp <command> [<verb>]` named in the file exists in the parser."""
    from scrimp.cli import build_parser

    def subparsers(p):
        return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)

    top = subparsers(build_parser())
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    code = re.findall(r"`([^`\n]+)`", text)  # inline code spans
    code += [ln for ln in text.splitlines() if ln.startswith("    ")]  # indented code blocks
    fence = None  # the language of the fenced block the line is in
    for ln in text.splitlines():
        if ln.startswith("```"):
            fence = None if fence is not None else (ln[3:].strip() or "text")
        elif fence is not None and fence != "python":
            code.append(ln)  # fenced blocks other than Python
    named = {m for c in code for m in re.findall(r"(?:^|[\s`(])scrimp ([a-z][a-z-]*)(?: ([a-z][a-z|-]*))?", c, re.M)
             if m[0] != "import"}  # `from scrimp import x` is Python, not a command
    if path == "README.md":
        assert named, "the README names no scrimp command"
    for command, verbs in named:
        assert command in top.choices, f"{path} names `scrimp {command}`, which does not exist"
        sub = subparsers(top.choices[command])
        if sub is None or not verbs:
            continue
        for verb in verbs.split("|"):
            assert verb in sub.choices, f"{path} names `scrimp {command} {verb}`, which does not exist"


#: phrases that narrate how the code came to be (history belongs in commit messages)
HISTORY = re.compile(r"\bsession\s+\d|\b(?:first|second|third|this|last|previous|next|earlier) session\b|"
                     r"\bpreviously\b|\btried and dropped\b|\bwork period\b", re.I)


def test_no_development_history():
    roots = ["README.md", "docs", "bench", "python/scrimp", "tests/python", "examples"]
    offenders = []
    for root in roots:
        top = os.path.join(ROOT, root)
        files = [top] if os.path.isfile(top) else [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
        for path in files:
            if not path.endswith((".md", ".py", ".cpp", ".h", ".txt")) or path.endswith("test_docs_examples.py"):
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                for i, line in enumerate(f, 1):
                    if HISTORY.search(line):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()[:100]}")
    assert offenders == []
