"""scrimp.icecache: IceCache, a clustered KV cache offloaded to host pages with a token budget.

    cache = scrimp.IceCache(model.config, budget=256, page_size=16, sink_pages=2, window_pages=2,
                            dense_layers=2, device="cuda")
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
"""
from .cache import METHODS, IceCache, IceCacheLayer
from .evaluate import demo_section, make_generate_fn

__all__ = ["IceCache", "IceCacheLayer", "METHODS", "make_generate_fn", "demo_section"]
