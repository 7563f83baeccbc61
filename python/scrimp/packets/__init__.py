"""KV Packet: recomputation-free, context-independent KV caching (arXiv 2604.13226).

* :class:`PacketStore` - the embeddable packet store (GPU / host / disk tiers, C++ core).
* :func:`rerotate_keys`, :func:`assemble` - RoPE re-rotation and fused assembly (C++/CUDA kernels).
* :mod:`scrimp.packets.method` - adapters, building packets, inference, baselines, FLOPs (one module each, re-exported there).
* :class:`Pruning` - score-based packet pruning (key norm or attention), adapter tokens kept.
"""
from __future__ import annotations

from .rope import AssembledKV, assemble, rerotate_keys, rope_inv_freq
from .prune import Pruning
from .store import Packet, PacketStore, packet_key

__all__ = ["PacketStore", "Packet", "packet_key", "rerotate_keys", "assemble", "rope_inv_freq",
           "AssembledKV", "Pruning", "demo_section"]


def demo_section(quick: bool = True) -> str:
    """A short printable report of KV Packet on the testbed (see :mod:`scrimp.packets.demo`)."""
    from .demo import demo_section as _demo

    return _demo(quick=quick)
