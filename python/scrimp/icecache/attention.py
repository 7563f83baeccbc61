"""How IceCache's attention reaches the query: the attention function ``"scrimp_icecache"`` (registered
with transformers' ``AttentionInterface``), the marks an IceCache layer's update leaves for it, and the
refusal of what that attention cannot run (model features, transformers releases).

``Cache.update`` never sees the query. An ``IceCache`` layer therefore marks its call (prefill, chunk or
decode) in the per-layer kwargs dict transformers passes both to ``Cache.update`` and to the attention
function, or, on releases whose update gets no such dict, in a per-thread slot that the next attention
call for that layer index takes; the attention function runs IceCache's attention for marked calls and
plain SDPA for every other call.
"""
from __future__ import annotations

import threading

import torch

from .. import hf

ATTN_NAME = "scrimp_icecache"

#: model features IceCache cannot run exactly (names from scrimp.hf.FEATURES): the decode attention is
#: plain softmax attention over every cached token of the layer, with the module's own scaling
REFUSED_FEATURES = ("sliding_window", "hybrid_layers", "attn_logit_softcapping", "attention_sinks")

#: attention-function kwargs that change attention away from causal softmax: kwarg -> feature name
_REFUSED_KWARGS = {"sliding_window": "sliding_window", "softcap": "attn_logit_softcapping",
                   "s_aux": "attention_sinks", "sinks": "attention_sinks"}


def _refuse_attention_call(module, kwargs):
    """ValueError when an attention call IceCache would serve carries a feature it cannot run."""
    layer = getattr(module, "layer_idx", "?")
    for name, feature in _REFUSED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"IceCache cannot run layer {layer} exactly: {feature} ({hf.FEATURES[feature]}): "
                             f"the attention call carries {name}={kwargs[name]!r}")
    for name in ("sinks", "sink"):
        if isinstance(getattr(module, name, None), torch.Tensor):
            raise ValueError(f"IceCache cannot run layer {layer} exactly: attention_sinks "
                             f"({hf.FEATURES['attention_sinks']}): the module has a learned '{name}' parameter")


#: the mark of the last IceCache layer update made without the attention kwargs dict (transformers
#: releases whose attention modules call ``cache.update(k, v, layer_idx)`` without ``kwargs=``): the
#: attention call that follows in the same thread, for the same layer index, takes it
_PENDING = threading.local()


def _mark(layer: "IceCacheLayer", kind: str, model_kwargs):
    """Tell the attention call that follows ``layer``'s update what to run (``kind``: "icecache_prefill",
    "icecache_chunk" or "icecache_decode"): in the kwargs dict transformers passes to both, or, where the
    update gets no such dict, in a per-thread slot taken by the next attention call for that layer."""
    if isinstance(model_kwargs, dict):
        model_kwargs[kind] = layer
        _PENDING.mark = None
    else:
        _PENDING.mark = (kind, layer)


def _take_mark(module, kwargs: dict):
    """Move a per-thread mark (see :func:`_mark`) into ``kwargs`` when it is for ``module``'s layer."""
    mark = getattr(_PENDING, "mark", None)
    if mark is None:
        return
    kind, layer = mark
    if getattr(module, "layer_idx", None) == layer.layer_idx:
        _PENDING.mark = None
        kwargs.setdefault(kind, layer)


#: the oldest transformers release IceCache is tested with (its Cache, CacheLayerMixin and
#: AttentionInterface APIs as used here)
MIN_TRANSFORMERS = "5.16.1"


def _check_transformers():
    """RuntimeError naming the installed and the required transformers version when it is too old."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(f"IceCache needs transformers >= {MIN_TRANSFORMERS}, found {transformers.__version__}: "
                           f"pip install 'transformers>={MIN_TRANSFORMERS}'")


def _register_attention():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTN_NAME in AttentionInterface._global_mapping:
        return

    def icecache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        _take_mark(module, kwargs)
        layer = kwargs.pop("icecache_decode", None)
        chunk = kwargs.pop("icecache_chunk", None)
        prefill = kwargs.pop("icecache_prefill", None)
        if layer is not None or chunk is not None or prefill is not None:
            _refuse_attention_call(module, kwargs)
        if layer is not None:
            return layer.decode_attention(module, query, scaling), None
        if chunk is not None:
            return chunk.chunk_attention(module, query, scaling, attention_mask), None
        out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
        if prefill is not None:
            prefill.finish_prefill(module, attention_mask)
        return out

    AttentionInterface.register(ATTN_NAME, icecache_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
