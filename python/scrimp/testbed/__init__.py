"""scrimp.testbed: small real Hugging Face models and the synthetic tasks they solve.

Every scrimp method is measured on these models (and, unchanged, on real
checkpoints such as Qwen3 or Llama-3.x):

* ``recall`` - a LlamaForCausalLM (RoPE, grouped-query attention) that answers
  key/value look-ups over long multi-document contexts (KV Packet, IceCache);
  ``recall-8k`` is ``recall`` continued with YaRN RoPE scaling on contexts of up to
  8,192 tokens, half of them filler lines (IceCache at long context);
* ``arith-teacher`` / ``arith-student`` - Qwen3ForCausalLM models that solve
  multi-step arithmetic as ``<think> steps </think> answer`` in two writing
  styles (TESSY); ``arith-student-teacher-style`` is a weaker student that writes
  the teacher's style (TIP's on-policy distillation pair with ``arith-teacher``);
  ``arith-teacher-robust`` continues traces of either style (or a mixture) correctly
  and writes the teacher style unprompted (TESSY's teacher).

All share one small tokenizer (:mod:`scrimp.testbed.tokenizer`)::

    model, tokenizer = scrimp.testbed.load("recall")
    scrimp.testbed.evaluate(model, tokenizer, "recall", n=50, context_tokens=2048)["accuracy"]

Heavy libraries (torch, transformers) are imported lazily.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from . import tasks
from .evaluate import evaluate

__all__ = ["MODELS", "path", "load", "evaluate", "tasks", "get_tokenizer", "shipped_metrics"]

#: shipped checkpoint name -> (directory under checkpoints/, task, style of its traces)
MODELS = {
    "recall": ("recall", "recall", None),
    "arith-teacher": ("arith-teacher", "arith", "teacher"),
    "arith-student": ("arith-student", "arith", "student"),
    # arith-student with 2 query / 1 KV heads of 32 (same width and size): vLLM's CPU attention
    # refuses heads of 16, so this is the student a vLLM server can serve
    "arith-student-h32": ("arith-student-h32", "arith", "student"),
    # TIP's pair: the teacher's own style, smaller and trained less (distillation has room to help)
    "arith-student-teacher-style": ("arith-student-teacher-style", "arith", "teacher"),
    # TESSY's teacher: arith-teacher fine-tuned on traces mixing both styles around correct steps, so
    # it continues a trace in either style correctly; unprompted it writes the teacher style
    "arith-teacher-robust": ("arith-teacher-robust", "arith", "teacher"),
    # recall continued with YaRN RoPE scaling (factor 4 over 2,048 positions) on contexts up to 8,948
    # tokens with filler lines: the long-context recall model (8,192 tokens, half filler)
    "recall-8k": ("recall-8k", "recall", None),
}

_CKPT_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


def _check_name(name):
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if name not in MODELS:
        raise ValueError(f"unknown testbed model {name!r}; valid names: {', '.join(MODELS)}")


def path(name: str) -> str:
    """Directory of the shipped checkpoint ``name`` (config, safetensors, tokenizer)."""
    _check_name(name)
    return os.path.join(_CKPT_ROOT, MODELS[name][0])


def load(name: str, dtype=None, device: Optional[str] = None):
    """Load a shipped testbed model and its tokenizer: ``model, tokenizer = load("recall")``.

    The model is an ordinary ``transformers`` causal LM loaded with
    ``AutoModelForCausalLM.from_pretrained``, in eval mode.
    """
    _check_name(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = path(name)
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise FileNotFoundError(f"checkpoint {name!r} is missing: no config.json in {d}")
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(d, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(d)
    return model, tokenizer


def shipped_metrics(name: str) -> dict:
    """The metrics recorded when the shipped checkpoint ``name`` was trained."""
    import json

    with open(os.path.join(path(name), "metrics.json")) as f:
        return json.load(f)


def get_tokenizer():
    """The testbed tokenizer, built in memory (identical to the shipped copies)."""
    from .tokenizer import get_tokenizer as _get

    return _get()
