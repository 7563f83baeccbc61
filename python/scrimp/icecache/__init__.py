"""scrimp.icecache: IceCache, a clustered KV cache offloaded to host pages with a token budget.

    cache = scrimp.IceCache(model.config, budget=256, page_size=16, sink_pages=2, window_pages=2,
                            dense_layers=2, device="cuda")
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

torch and transformers are imported on first use of a name below.
"""
_LAZY = {"IceCache": "cache", "IceCacheLayer": "cache", "METHODS": "cache", "make_generate_fn": "evaluate",
         "demo_section": "evaluate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'scrimp.icecache' has no attribute {name!r}")


__all__ = sorted(_LAZY)
