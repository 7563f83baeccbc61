"""Naming and loading models: one spec string for the Python API and every CLI command.

A model spec is one of

* ``testbed:NAME`` - a checkpoint shipped with scrimp (``testbed:recall``, ``testbed:arith-teacher``);
* a local directory holding a Hugging Face checkpoint (``config.json`` + weights + tokenizer);
* a hub id (``Qwen/Qwen3-0.6B``), loaded with the standard ``from_pretrained``.

plus a ``device`` (``auto`` = the first CUDA device when there is one, else the CPU) and a ``dtype``
(``auto`` = the checkpoint's own dtype; ``float32``, ``bfloat16``, ``float16``)::

    model, tokenizer = scrimp.load_model("testbed:recall")
    model, tokenizer = scrimp.load_model("/ckpt/Llama-3.2-1B-Instruct", device="cuda", dtype="bfloat16")

Named sources such as ``testbed:`` are resolved through :data:`SOURCES` (scheme -> "module:function"
returning a directory), imported only when a spec names them, so library modules never import the
testbed. CLI commands add the shared options with :func:`add_model_arguments`.
"""
from __future__ import annotations

import argparse
import importlib
import os
from typing import Optional, Tuple, Union

__all__ = ["SOURCES", "resolve_model_spec", "resolve_device", "resolve_dtype", "load_model", "load_tokenizer",
           "add_model_arguments", "add_device_dtype_arguments", "DTYPES"]

#: scheme -> "module:function" that maps the name after ``scheme:`` to a checkpoint directory
SOURCES = {"testbed": "scrimp.testbed:path"}

#: dtype names accepted by :func:`resolve_dtype` (``auto`` keeps the checkpoint's dtype)
DTYPES = ("auto", "float32", "bfloat16", "float16")

SPEC_HELP = ("testbed:NAME (a shipped checkpoint), a local Hugging Face checkpoint directory, "
             "or a hub id loaded with from_pretrained")


def resolve_model_spec(spec: str) -> str:
    """The directory or hub id that ``from_pretrained`` should load for ``spec``.

    Raises ValueError for an unknown ``scheme:`` or a ``testbed:`` name that does not exist, and
    FileNotFoundError for a path-like spec (starting with ``/``, ``.`` or ``~``) that is not a directory.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a model spec must be a str, got {type(spec).__name__}")
    spec = spec.strip()
    if not spec:
        raise ValueError("empty model spec; expected testbed:NAME, a checkpoint directory or a hub id")
    scheme, sep, name = spec.partition(":")
    if sep and scheme in SOURCES:
        if not name:
            raise ValueError(f"model spec {spec!r} names no model after '{scheme}:'")
        module, func = SOURCES[scheme].split(":")
        return getattr(importlib.import_module(module), func)(name)
    if sep and "/" not in scheme and not os.path.exists(spec):
        raise ValueError(f"unknown model source {scheme!r} in {spec!r}; known: "
                         f"{', '.join(s + ':NAME' for s in SOURCES)}, a directory or a hub id")
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} is a directory without config.json: not a Hugging Face checkpoint")
        return path
    if spec.startswith(("/", ".", "~")) or os.path.exists(path):
        raise FileNotFoundError(f"model directory {path} does not exist (or is not a directory)")
    return spec  # a hub id


def resolve_device(device=None):
    """``None``/``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else -> ``torch.device``."""
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def resolve_dtype(dtype=None):
    """``None``/``"auto"`` -> ``None`` (keep the checkpoint's); a name in :data:`DTYPES` or a torch dtype."""
    import torch

    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"model dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return getattr(torch, dtype)
    raise ValueError(f"invalid dtype {dtype!r}; expected one of {', '.join(DTYPES)} or a torch float dtype")


def load_tokenizer(spec: str):
    """The tokenizer of the model named by ``spec`` (``AutoTokenizer.from_pretrained``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_spec(spec))


def load_model(spec: str, *, device=None, dtype=None, tokenizer: bool = True, **from_pretrained_kwargs
               ) -> Union[Tuple[object, object], object]:
    """Load a causal LM (in eval mode) and, by default, its tokenizer: ``model, tok = load_model(spec)``.

    Parameters
    ----------
    spec : str
        ``testbed:NAME``, a checkpoint directory or a hub id (see the module docstring).
    device : str or torch.device, optional
        ``auto`` (default): CUDA when available, else CPU.
    dtype : str or torch.dtype, optional
        ``auto`` (default) keeps the checkpoint's dtype.
    tokenizer : bool
        Return ``(model, tokenizer)`` when True (default), the model alone when False.
    **from_pretrained_kwargs
        Passed on to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoModelForCausalLM

    where = resolve_model_spec(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    kwargs = dict(from_pretrained_kwargs)
    if dt is not None:
        kwargs["dtype"] = dt
    model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    model = model.to(dev)
    model.eval()
    if not tokenizer:
        return model
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(where)


def add_device_dtype_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` and ``--dtype`` with their shared meaning."""
    parser.add_argument("--device", default="auto",
                        help="where models run: auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="model weights dtype (auto: the checkpoint's own)")


def add_model_arguments(parser: argparse.ArgumentParser, *names: str, default: Optional[str] = None,
                        required: bool = False, device_dtype: bool = True) -> None:
    """Add model spec options (``--model`` unless ``names`` are given) plus ``--device``/``--dtype``."""
    for name in names or ("--model",):
        what = name.lstrip("-").replace("-", " ")
        suffix = f" (default {default})" if default else ""
        parser.add_argument(name, default=default, required=required and default is None,
                            help=f"{what}: {SPEC_HELP}{suffix}")
    if device_dtype:
        add_device_dtype_arguments(parser)
