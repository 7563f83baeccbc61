"""Hugging Face plumbing shared by every method: where a causal LM keeps its parts, and which of its
features a method cannot run exactly.

Methods never reach into ``model.model.layers`` themselves; they ask here::

    layers = hf.decoder_layers(model)          # nn.ModuleList of decoder layers
    head = hf.lm_head(model)                   # the output projection (hidden -> vocabulary)
    hf.refuse_features(model.config, "IceCache", refuse=("sliding_window", "attn_logit_softcapping"))

:func:`model_features` lists, by name, the config features that change attention or the logits away
from plain causal softmax attention over ``lm_head(hidden)``; a method refuses the ones it does not
implement with :func:`refuse_features`, which raises ValueError naming the feature and the layers.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

__all__ = ["text_config", "decoder_layers", "base_model", "lm_head", "input_embeddings", "rotary_embedding",
           "rope_parameters", "model_features", "refuse_features", "FEATURES"]

#: feature name -> what it is (the names :func:`model_features` reports)
FEATURES = {
    "sliding_window": "sliding-window attention layers",
    "hybrid_layers": "layers that are not full softmax attention (linear / recurrent / chunked)",
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "logit_scale": "logits scaled after the LM head",
    "attention_sinks": "learned attention sinks",
    "no_rope": "no rotary position embedding",
    "query_pre_attn_scalar": "attention scaled by a query_pre_attn_scalar other than head_dim",
}


def text_config(config):
    """The text (decoder) config of ``config`` (the config itself for plain causal LMs)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def base_model(model):
    """The decoder stack without the LM head (``model.model`` for Llama/Qwen/Mistral/Phi-3)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        get = getattr(model, "get_decoder", None)
        base = get() if callable(get) else None
    if base is None:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder stack (no .model / get_decoder())")
    return base


def decoder_layers(model):
    """The ``nn.ModuleList`` of decoder layers of a causal LM."""
    base = base_model(model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: its decoder has no .layers list")
    return layers


def lm_head(model):
    """The output projection ``hidden -> logits`` (``model.get_output_embeddings()``)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head


def input_embeddings(model):
    """The token embedding module (``model.get_input_embeddings()``)."""
    emb = model.get_input_embeddings()
    if emb is None:
        raise ValueError(f"{type(model).__name__} has no input embeddings")
    return emb


def rotary_embedding(model):
    """The model's shared rotary embedding module (``model.model.rotary_emb``), or ValueError."""
    rot = getattr(base_model(model), "rotary_emb", None)
    if rot is None:
        raise ValueError(f"{type(model).__name__} has no shared rotary embedding (rotary_emb): not a RoPE model "
                         "or a layout scrimp does not know")
    return rot


def rope_parameters(config) -> Dict:
    """The RoPE parameters of ``config`` as one dict with at least ``rope_type`` and ``rope_theta``.

    Reads ``rope_parameters`` (transformers >= 5) or ``rope_scaling`` + ``rope_theta`` (older), and
    ``partial_rotary_factor`` wherever the config keeps it.
    """
    c = text_config(config)
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, dict) and params and not isinstance(next(iter(params.values())), dict):
        out = dict(params)
    elif isinstance(params, dict) and params:  # per layer-type parameters: take full attention's
        out = dict(params.get("full_attention") or next(iter(params.values())))
    else:
        out = dict(getattr(c, "rope_scaling", None) or {})
        if getattr(c, "rope_theta", None) is not None:
            out.setdefault("rope_theta", c.rope_theta)
    out["rope_type"] = out.get("rope_type", out.get("type", "default")) or "default"
    if "partial_rotary_factor" not in out and getattr(c, "partial_rotary_factor", None) is not None:
        out["partial_rotary_factor"] = c.partial_rotary_factor
    return out


def _layer_types(c) -> Optional[List[str]]:
    lt = getattr(c, "layer_types", None)
    return list(lt) if lt else None


def model_features(config, model=None) -> Dict[str, str]:
    """Features of ``config`` (and, when given, of ``model``'s modules) away from plain causal attention.

    Returns ``{feature name: detail}`` with names from :data:`FEATURES`; empty for a plain Llama.
    """
    c = text_config(config)
    found: Dict[str, str] = {}
    n_layers = getattr(c, "num_hidden_layers", None)
    types = _layer_types(c)
    if types is not None:
        sliding = [i for i, t in enumerate(types) if "sliding" in t]
        other = [i for i, t in enumerate(types) if t != "full_attention" and "sliding" not in t]
        if sliding:
            found["sliding_window"] = f"layers {sliding} (window {getattr(c, 'sliding_window', None)})"
        if other:
            found["hybrid_layers"] = f"layers {other} ({', '.join(sorted({types[i] for i in other}))})"
    elif getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True) is not False:
        first = getattr(c, "max_window_layers", 0) if getattr(c, "use_sliding_window", None) else 0
        layers = list(range(first, n_layers)) if n_layers else "all"
        found["sliding_window"] = f"layers {layers} (window {c.sliding_window})"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = getattr(c, name, None)
        if v:
            found[name] = f"{name}={v}"
    for name in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        v = getattr(c, name, None)
        if v is not None and float(v) != 1.0:
            found["logit_scale"] = f"{name}={v}"
    qs = getattr(c, "query_pre_attn_scalar", None)
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // c.num_attention_heads
                                                if getattr(c, "num_attention_heads", None) else None)
    if qs is not None and head_dim is not None and float(qs) != float(head_dim):
        found["query_pre_attn_scalar"] = f"query_pre_attn_scalar={qs} (head_dim {head_dim})"
    if getattr(c, "no_rope_layers", None) and not all(getattr(c, "no_rope_layers")):
        found["no_rope"] = f"no_rope_layers={list(c.no_rope_layers)}"
    if model is not None:
        sinks = [name for name, p in model.named_parameters() if name.endswith(".sinks") or name.endswith(".sink")]
        if sinks:
            found["attention_sinks"] = f"parameters {sinks[:3]}{' ...' if len(sinks) > 3 else ''}"
    return found


def refuse_features(config, method: str, refuse: Iterable[str] = tuple(FEATURES), model=None) -> None:
    """Raise ValueError when ``config`` (or ``model``) has any feature in ``refuse`` that ``method`` cannot run.

    The message names the method, each feature and where it is (layers or config field).
    """
    unknown = [f for f in refuse if f not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature name(s) {unknown}; known: {', '.join(FEATURES)}")
    found = model_features(config, model)
    bad = [(f, found[f]) for f in refuse if f in found]
    if bad:
        what = "; ".join(f"{f} ({FEATURES[f]}): {detail}" for f, detail in bad)
        arch = getattr(text_config(config), "model_type", type(config).__name__)
        raise ValueError(f"{method} cannot run this {arch} model exactly: {what}")
