"""scrimp.icecache: IceCache, a clustered KV cache offloaded to host pages with a token budget.

    cache = scrimp.IceCache(model, budget=256)                      # scrimp's defaults
    cache = scrimp.IceCache(model, budget=256, **scrimp.icecache.PAPER)  # the paper's configuration
    cache = scrimp.IceCache(model, scrimp.icecache.IceCacheOptions(budget=64))  # one options object
    out = scrimp.icecache.generate(model, input_ids, cache, attention_mask=mask, max_new_tokens=32)

torch and transformers are imported on first use of a name below.
"""
_LAZY = {"IceCache": "cache", "IceCacheLayer": "cache", "METHODS": "cache", "REFUSED_FEATURES": "cache",
         "PAPER": "cache", "DEFAULT_RERANK": "cache", "IceCacheOptions": "options",
         "generate": "cache", "cache_argument": "cache", "make_generate_fn": "evaluate", "evaluate": "evaluate",
         "load_jsonl": "evaluate", "answer_matches": "evaluate", "demo_section": "demo"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'scrimp.icecache' has no attribute {name!r}")


__all__ = sorted(_LAZY)
