"""IceCache as a ``transformers`` Cache: the cache object a model is given (its layers, checks and
reports) and ``generate``.

The prompt is attended densely (in one pass, or chunk by chunk) and its tokens go to three places per
layer and KV head: the first sink tokens and the recent window stay resident on the device, every
other token goes to a host page index (clustered pages). Each decode step selects the best pages
within a token budget and runs paged decode attention over sink + selected pages + window
(``layer.py``); the attention reaches the layer as ``attention.py`` says; the options are
``options.IceCacheOptions``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .. import _C
from .. import hf
from .attention import ATTN_NAME, REFUSED_FEATURES, _check_transformers, _register_attention  # noqa: F401
from .attention import MIN_TRANSFORMERS  # noqa: F401
from .coarse import coarse_groups  # noqa: F401
from .layer import _DTYPES, _METHOD_INDEX, IceCacheLayer
from .options import DEFAULT_RERANK, METHODS, PAPER, IceCacheOptions  # noqa: F401


def cache_argument(model) -> str:
    """The keyword under which ``model.generate`` / ``model(...)`` take a Cache: ``"cache"`` where the
    installed transformers names it so, ``"past_key_values"`` on the versions before the rename."""
    forward = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def generate(model, input_ids, cache: "IceCache", **generate_kwargs):
    """``model.generate(input_ids, ...)`` with ``cache``, passed the way the installed transformers
    wants it, and the cache's ``prefill_chunk`` as transformers' ``prefill_chunk_size``."""
    if not isinstance(cache, IceCache):
        raise TypeError(f"cache must be an IceCache, got {type(cache).__name__}")
    if cache.prefill_chunk is not None:
        generate_kwargs.setdefault("prefill_chunk_size", cache.prefill_chunk)
    generate_kwargs[cache_argument(model)] = cache
    return model.generate(input_ids, **generate_kwargs)


class IceCache(Cache):
    """A transformers ``Cache`` implementing IceCache (and its baselines) for decoders whose layers are
    all full causal softmax attention (Llama, Qwen2, Qwen3, Mistral without sliding window, Phi-3, ...).

    ``cache = IceCache(model, budget=256)`` then ``scrimp.icecache.generate(model, input_ids, cache,
    max_new_tokens=32)`` (or ``model.generate(..., cache=cache)``; ``past_key_values=cache`` on
    transformers versions that do not take ``cache=``).

    Parameters
    ----------
    model_or_config : the model, or its ``PretrainedConfig``. The config is switched to the
        ``"scrimp_icecache"`` attention implementation (plain SDPA for every call not made through an
        IceCache layer). Models with sliding-window or non-attention layers, attention logit
        soft-capping or learned attention sinks are refused with a ValueError naming the feature and
        the layers (:data:`REFUSED_FEATURES`); so are models not loaded with ``attn_implementation="sdpa"``.
        Given the model (not only its config), its modules are checked too (learned sinks, SDPA support).
    options : an :class:`IceCacheOptions` (None: the defaults); every option is documented there.
    **overrides : option fields by name (``budget=64``, ``**PAPER``), applied over ``options``.
    """

    def __init__(self, model_or_config, options: Optional[IceCacheOptions] = None, **overrides):
        _check_transformers()
        opts = IceCacheOptions.of(options, **overrides).resolved()
        model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
        config = model.config if model is not None else model_or_config
        if not hasattr(config, "num_hidden_layers") and not hasattr(config, "get_text_config"):
            raise TypeError(f"IceCache needs a model or its transformers config, got {type(model_or_config).__name__}")
        method = opts.method
        if method != "full":
            hf.refuse_features(config, "IceCache", refuse=REFUSED_FEATURES, model=model)
            if model is not None and getattr(model, "_supports_sdpa", True) is False:
                raise ValueError(f"IceCache cannot run {type(model).__name__}: its attention has no SDPA path "
                                 "(IceCache's attention is SDPA-equivalent softmax attention)")
        text = hf.text_config(config)
        self.config = config
        self.options = opts
        self.num_layers = int(text.num_hidden_layers)
        self.q_heads = int(text.num_attention_heads)
        self.kv_heads = int(getattr(text, "num_key_value_heads", None) or self.q_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // self.q_heads)
        for f in dataclasses.fields(opts):  # the layers read the options as the cache's attributes
            if f.name != "prefetch":
                setattr(self, f.name, getattr(opts, f.name))
        self._prefetch = opts.prefetch
        self.selected_pages = 0 if method == "streaming" else opts.budget // opts.page_size - opts.sink_pages - \
            opts.window_pages
        self.cache_pages = opts.cache_pages if opts.cache_pages is not None else max(2 * self.selected_pages, 1)
        if self.cache_pages < self.selected_pages:
            raise ValueError(f"cache_pages ({self.cache_pages}) must be >= the selected pages per step "
                             f"({self.selected_pages})")
        dense_layers, reuse_selection = opts.dense_layers, opts.reuse_selection
        layers = []
        for i in range(self.num_layers):
            layers.append(DynamicLayer() if (method == "full" or i < dense_layers) else IceCacheLayer(self, i))
        sparse = [l for l in layers if isinstance(l, IceCacheLayer)]
        for j, layer in enumerate(sparse):
            if j % (reuse_selection + 1):
                layer.leader = sparse[j - j % (reuse_selection + 1)]
                layer.leader.followers.append(layer)
        super().__init__(layers=layers)
        if method != "full":
            _register_attention()
            if config._attn_implementation not in ("sdpa", ATTN_NAME):
                raise ValueError(f"IceCache needs a model with attn_implementation='sdpa' (got "
                                 f"{config._attn_implementation!r}); load it with attn_implementation='sdpa'")
            config._attn_implementation = ATTN_NAME

    @property
    def prefetch(self) -> bool:
        """Whether followers' pages are copied ahead (see ``prefetch``); decided on the device in use."""
        if not self.reuse_selection:
            return False
        if self._prefetch is not None:
            return self._prefetch
        dev = next((l.device for l in self.layers if isinstance(l, IceCacheLayer) and l.is_initialized), None)
        return dev is not None and torch.device(dev).type == "cuda"

    # ---- checks ------------------------------------------------------------------------------------
    def _check_states(self, k, v, layer_idx, shape=None, dtype=None):
        if layer_idx >= self.num_layers:
            raise ValueError(f"layer index {layer_idx} >= the config's {self.num_layers} layers: "
                             "is this cache used with a different model?")
        if k.dim() != 4 or k.shape[1] != self.kv_heads or k.shape[3] != self.head_dim:
            raise ValueError(f"keys of shape {tuple(k.shape)} do not match the config ({self.kv_heads} KV heads, "
                             f"head_dim {self.head_dim}): is this cache used with a different model?")
        if v.shape != k.shape:
            raise ValueError(f"values {tuple(v.shape)} and keys {tuple(k.shape)} differ in shape")
        if k.dtype != v.dtype or k.dtype not in _DTYPES:
            raise TypeError(f"keys/values must share a float32/float16/bfloat16 dtype, got {k.dtype} and {v.dtype}")
        if dtype is not None and k.dtype != dtype:
            raise TypeError(f"layer {layer_idx}: keys are {k.dtype} but the cache holds {dtype}")
        if shape is not None and (k.shape[0], k.shape[1], k.shape[3]) != shape:
            raise ValueError(f"layer {layer_idx}: batch/heads/dim {tuple(k.shape)} differ from the prefill's {shape}; "
                             "create a new IceCache for each model and sequence")

    def _check_module(self, module):
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg is not self.config:
            raise ValueError("this IceCache was created for a different model (its config is not the model's); "
                             "create one IceCache per model and sequence")

    def _select_on_device(self, device) -> bool:
        if self.method not in ("icecache", "quest"):
            return False  # the other scores read the host pool (oracle) or are random
        if self.select_on_device is None:
            return torch.device(device).type == "cuda"
        return bool(self.select_on_device)

    def _uses_index(self) -> bool:
        return not (self.method == "streaming" and self.selected_pages == 0)

    def _max_pages_cap(self) -> Optional[int]:
        """Most pages per stream the host pool may hold (from max_context), None = unbounded."""
        if self.max_context is None:
            return None
        groups = -(-self.max_context // self.coarse_tokens) if self.coarse_tokens else 1
        return self.max_context // self.page_size + groups + 2

    def _new_index(self, B, H, D, dtype, max_pages, slots):
        cluster, score = _METHOD_INDEX[self.method]
        return _C.ClusteredCache(B, H, self.q_heads, D, self.page_size, max_pages, slots, _DTYPES[dtype],
                                 cluster, score, 6, self.seed, self.pin_memory)

    # ---- reporting ---------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        """Bytes held on the device by the whole cache (dense layers in full)."""
        n = 0
        for layer in self.layers:
            if isinstance(layer, IceCacheLayer):
                n += layer.device_bytes()
            elif layer.is_initialized and layer.keys is not None:
                n += layer.keys.numel() * layer.keys.element_size() * 2
        return n

    def stats(self) -> dict:
        hits = misses = copied = pool = 0
        mass = []
        for layer in self.layers:
            if isinstance(layer, IceCacheLayer):
                s = layer.index_stats()
                hits, misses, copied, pool = hits + s["hits"], misses + s["misses"], copied + s["bytes_copied"], \
                    pool + s["pool_bytes"]
                mass += layer.stats["mass"]
        return {"hits": hits, "misses": misses, "bytes_copied": copied, "host_pool_bytes": pool,
                "device_bytes": self.device_bytes(),
                "attention_mass": (sum(mass) / len(mass)) if mass else None}
