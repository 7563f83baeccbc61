"""The Hugging Face model as KV Packet calls it: fingerprints, one forward call across transformers
releases, embeddings, the KV layout and token-id checks."""
from __future__ import annotations

import hashlib
import inspect
import json
from typing import Optional, Tuple

import torch

from .prompt import Prompt


# ----------------------------------------------------------------------------- model helpers

def model_fingerprint(model, as_dtype: Optional[torch.dtype] = None) -> str:
    """SHA-256 over the model's config and weights (sampled for models over 64M parameters).

    The weights are hashed in the dtype they have, so the same checkpoint loaded at float32 and at
    bfloat16 gives two fingerprints (a packet's KV depends on the dtype). ``as_dtype``: hash the
    floating point weights cast to that dtype instead (:func:`model_fingerprint_any_dtype`)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    total = sum(p.numel() for p in model.parameters())
    for name, p in sorted(model.state_dict().items()):
        if as_dtype is not None and p.is_floating_point():
            p = p.detach().to(as_dtype)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        t = p.detach().reshape(-1)
        if total > 64_000_000 and t.numel() > 8192:
            t = torch.cat([t[:4096], t[-4096:]])
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def model_fingerprint_any_dtype(model) -> str:
    """:func:`model_fingerprint` with the weights cast to bfloat16: equal for one checkpoint loaded
    at float32 or bfloat16, so a fingerprint mismatch can be told apart from a dtype mismatch."""
    return model_fingerprint(model, as_dtype=torch.bfloat16)


def model_dtype_name(model) -> str:
    """The dtype of the model's first parameter, e.g. ``"float32"``."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


def _wrong_model_message(what: str, fp: str, dtype: Optional[str], fp_any_dtype: Optional[str], model,
                         mine: str) -> str:
    """The ValueError text for adapters trained for fingerprint ``fp`` (at ``dtype``, whose
    dtype-free fingerprint is ``fp_any_dtype``; None when unknown) used with ``model``."""
    here = model_dtype_name(model)
    if dtype and dtype != here and fp_any_dtype and fp_any_dtype == model_fingerprint_any_dtype(model):
        return (f"{what} were trained for this model at dtype {dtype}, and it is loaded as {here}: a packet's KV "
                f"depends on the dtype; load the model with dtype {dtype} (or train adapters at {here})")
    trained = f" (dtype {dtype})" if dtype else ""
    return f"{what} were trained for model {fp}{trained}, not this model ({mine}, dtype {here})"


def _cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model, cache=None, **kw):
    if cache is not None:
        kw[_cache_kw(model)] = cache
    return model(**kw)


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def _embed(model, ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(ids)


def vocab_size(model) -> int:
    """Rows of the model's input embedding table: token ids must be below it."""
    from .. import hf

    return int(hf.input_embeddings(model).num_embeddings)


def check_token_ids(model, prompt, name: str = "prompt") -> None:
    """ValueError naming the part (``prefix``, ``documents[i]``, ``question``, or ``name`` for plain
    ids) whose token ids reach past the model's vocabulary."""
    n = vocab_size(model)
    parts = ([("prefix", prompt.prefix), *((f"documents[{i}]", d) for i, d in enumerate(prompt.documents)),
              ("question", prompt.question)] if isinstance(prompt, Prompt) else [(name, prompt)])
    for part, ids in parts:
        top = max(ids, default=-1)
        if top >= n:
            raise ValueError(f"{part}: token id {top} is outside the model's vocabulary "
                             f"({n} input embeddings, ids 0..{n - 1})")


def _device(model):
    return next(model.parameters()).device


def _kv_layout(model) -> Tuple[int, int, int]:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", c.num_attention_heads), head_dim
