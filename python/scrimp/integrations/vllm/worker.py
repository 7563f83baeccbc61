"""The worker half's job: a request's packets, back to back after its prefix, written into vLLM's paged cache.

The KV comes from the same code :class:`~scrimp.packets.method.PacketEngine` runs (``positions="slots"``):
each document's packet from the :class:`~scrimp.packets.PacketStore` (built on a miss by prefilling
``[header, document, trailer]`` alone with a Hugging Face copy of the served model), re-rotated by the
core to its slots. Rows go into vLLM's cache through the attention backend's own cache write
(``impl.do_kv_cache_update``), so the CPU backend's packed block layout and the GPU layouts take one path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ...packets.adapter import Adapters
from ...packets.engine import PacketEngine
from ...packets.prompt import Prompt
from ...packets.store import PacketStore

__all__ = ["LoadSpec", "PacketWriter", "slot_mapping", "layer_index"]

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class LoadSpec:
    """One request's load, decided by the scheduler half: write rows ``[start, end)`` of the sequence
    (``token_ids[:end]`` = prefix + document spans) into the slots of ``block_ids``."""
    req_id: str
    token_ids: List[int]
    spans: List[Tuple[int, int]]
    start: int
    end: int
    block_ids: List[int]


def slot_mapping(block_ids: Sequence[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """Slot of every sequence row in ``[start, end)``: ``block_ids[r // block_size] * block_size +
    r % block_size`` (int64 ``[end - start]``)."""
    rows = torch.arange(start, end, dtype=torch.long)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.long)
    if end > len(block_ids) * block_size:
        raise ValueError(f"rows up to {end} need {-(-end // block_size)} blocks of {block_size}, "
                         f"the request has {len(block_ids)}")
    return blocks[rows // block_size] * block_size + rows % block_size


def layer_index(layer_name: str) -> int:
    """Decoder layer index of a vLLM attention layer name (``model.layers.3.self_attn.attn`` -> 3)."""
    m = _LAYER_RE.search(layer_name)
    if m is None:
        raise ValueError(f"cannot tell the decoder layer of vLLM attention layer {layer_name!r}")
    return int(m.group(1))


class PacketWriter:
    """Builds, stores and writes packets for the connector's worker half (one per worker process)."""

    def __init__(self, model_path: str, adapters_path: str, *, dtype: torch.dtype, device: str,
                 store_path: Optional[str] = None, host_bytes: int = 1 << 30, disk_bytes: Optional[int] = None):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(device)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        adapters = Adapters.load(adapters_path, model)  # refuses adapters trained for another model
        self.store = PacketStore(path=store_path, host_bytes=host_bytes, disk_bytes=disk_bytes)
        # refuses the model features KV Packet cannot run (sliding window, soft-capping, ...) by name
        self.engine = PacketEngine(model, None, adapters, self.store, positions="slots")
        self.n_header, self.n_trailer = adapters.n_header, adapters.n_trailer

    @torch.no_grad()
    def request_kv(self, spec: LoadSpec):
        """Per-layer K/V ``[1, kv_heads, spec.end, head_dim]`` of the prefix and the packets (the
        assembled KV ``PacketEngine(positions="slots")`` attends to)."""
        ids = spec.token_ids
        prefix = ids[:spec.spans[0][0]]
        docs = [ids[s + self.n_header:e - self.n_trailer] for s, e in spec.spans]
        prompt = Prompt(prefix, docs, [ids[spec.end - 1]])  # the question is not computed here
        kv = self.engine.prepare(prompt)[3]
        if kv.keys[0].shape[2] != spec.end:
            raise RuntimeError(f"request {spec.req_id}: assembled {kv.keys[0].shape[2]} rows, expected {spec.end}")
        return kv

    def write(self, spec: LoadSpec, layers: Dict[str, torch.nn.Module], block_size: int,
              tp_rank: int = 0, tp_size: int = 1) -> None:
        """Write rows ``[spec.start, spec.end)`` of every layer into the paged cache of ``layers``
        (vLLM attention layers by name, each with ``kv_cache`` and ``impl``)."""
        kv = self.request_kv(spec)
        slots = None
        for name, layer in layers.items():
            cache = getattr(layer, "kv_cache", None)
            if not isinstance(cache, torch.Tensor) or cache.numel() == 0:
                continue
            impl = layer.impl
            if not hasattr(impl, "do_kv_cache_update"):
                raise RuntimeError(f"the attention backend of {name} ({type(impl).__name__}) has no separate "
                                   "cache write (do_kv_cache_update); the KV Packet connector needs one")
            if slots is None:
                slots = slot_mapping(spec.block_ids, block_size, spec.start, spec.end).to(cache.device)
            li = layer_index(name)
            k, v = kv.keys[li][0], kv.values[li][0]  # [kv_heads, rows, head_dim]
            heads = k.shape[0] // tp_size
            k = k[tp_rank * heads:(tp_rank + 1) * heads, spec.start:spec.end]
            v = v[tp_rank * heads:(tp_rank + 1) * heads, spec.start:spec.end]
            dt = cache.dtype if cache.dtype.is_floating_point and cache.element_size() >= 2 else k.dtype
            k = k.transpose(0, 1).to(device=cache.device, dtype=dt).contiguous()  # [rows, heads, head_dim]
            v = v.transpose(0, 1).to(device=cache.device, dtype=dt).contiguous()
            impl.do_kv_cache_update(layer, k, v, cache, slots)
