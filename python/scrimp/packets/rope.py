"""RoPE re-rotation of cached keys and fused assembly of packets (compiled CPU / CUDA kernels)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from .. import _C

__all__ = ["rerotate_keys", "assemble", "rope_inv_freq", "AssembledKV"]

_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _freqs(inv_freq) -> List[float]:
    if isinstance(inv_freq, torch.Tensor):
        if not inv_freq.dtype.is_floating_point:
            raise TypeError(f"inv_freq must be floating point, got {inv_freq.dtype}")
        return [float(x) for x in inv_freq.detach().reshape(-1).cpu().double().tolist()]
    return [float(x) for x in inv_freq]


def rerotate_keys(keys: torch.Tensor, delta: Union[int, torch.Tensor], inv_freq, layout: str = "half",
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Move cached keys by ``delta`` positions: ``R(p + delta) k`` from ``R(p) k``.

    Parameters
    ----------
    keys : Tensor ``[batch, kv_heads, seq, head_dim]`` (float32/16, bfloat16, float64; CPU or CUDA),
        head_dim contiguous.
    delta : int, or an int64 tensor ``[seq]`` (one offset per position).
    inv_freq : the model's RoPE frequencies ``[rotary_dim / 2]`` (any scaling: default, llama3,
        linear, yarn's frequencies); dims past ``rotary_dim`` are left as they are.
    layout : "half" (HF ``rotate_half``: pairs i, i + R/2) or "interleaved" (pairs 2i, 2i+1).
    out : optional output (may be ``keys`` itself for in place).
    """
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys: expected a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype not in _FLOAT:
        raise TypeError(f"keys: expected a floating dtype, got {keys.dtype}")
    if keys.dim() != 4:
        raise ValueError(f"keys: expected [batch, kv_heads, seq, head_dim], got shape {tuple(keys.shape)}")
    if layout not in ("half", "interleaved"):
        raise ValueError(f"layout must be 'half' or 'interleaved', got {layout!r}")
    if out is None:
        out = torch.empty_like(keys)
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    dtensor = None
    dint = 0
    if isinstance(delta, torch.Tensor):
        if delta.dtype.is_floating_point:
            raise TypeError(f"delta must be an int or an integer tensor, got {delta.dtype}")
        dtensor = delta.to(device=keys.device, dtype=torch.int64).reshape(-1)
        if dtensor.numel() == 1 and keys.shape[2] != 1:
            dint, dtensor = int(dtensor.item()), None
    elif isinstance(delta, bool) or not isinstance(delta, int):
        raise TypeError(f"delta must be an int or an int64 tensor, got {type(delta).__name__}")
    else:
        dint = delta
    _C.rerotate_keys(keys, out, dint, dtensor, _freqs(inv_freq), layout, stream=_stream(keys))
    return out


def rope_inv_freq(model) -> torch.Tensor:
    """The RoPE frequencies a transformers model uses (its rotary module's ``inv_freq``)."""
    base = getattr(model, "model", model)
    rot = getattr(base, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise ValueError(f"{type(model).__name__} has no rotary_emb.inv_freq (not a RoPE model?)")
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    if scaling != 1.0:
        raise ValueError(f"RoPE attention scaling {scaling} != 1 is not supported by re-rotation")
    return rot.inv_freq.detach().float().cpu()


class AssembledKV:
    """Per-layer K/V ``[1, kv_heads, seq, head_dim]`` produced by :func:`assemble`."""

    def __init__(self, keys: List[torch.Tensor], values: List[torch.Tensor], spans):
        self.keys = keys
        self.values = values
        self.spans = spans  # (start, end) sequence index of each packet

    def to_cache(self, config=None):
        """A ``transformers.DynamicCache`` holding these tensors (no copy)."""
        from transformers import DynamicCache

        try:
            return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)), config=config)
        except TypeError:  # older transformers
            return DynamicCache.from_legacy_cache(tuple(zip(self.keys, self.values)))


def assemble(packets: Sequence, starts: Optional[Sequence[int]] = None, *, prefix=None,
             out=None) -> AssembledKV:
    """Re-rotate and concatenate packets into one per-layer KV cache in one fused pass.

    Parameters
    ----------
    packets : :class:`~scrimp.packets.store.Packet` objects (same model layout, dtype and device).
    starts : new start position of each packet; default: back to back after ``prefix``.
    prefix : optional ``(keys, values)`` per layer ``[1, H, P, D]`` placed first (e.g. a freshly
        computed ``<bos>``/preamble); it is copied, not rotated.
    out : optional ``(keys, values)`` lists of preallocated ``[1, H, S, D]`` tensors to write into
        (S >= prefix + packets; reused buffers avoid allocation and page faults).
    """
    packets = list(packets)
    if not packets:
        raise ValueError("assemble: no packets given")
    m0 = packets[0].meta
    for i, p in enumerate(packets):
        m = p.meta
        for k in ("model_fingerprint", "num_layers", "num_kv_heads", "head_dim"):
            if m[k] != m0[k]:
                raise ValueError(f"assemble: packet {i} has {k}={m[k]!r}, packet 0 has {m0[k]!r}")
        if m["dtype"] != m0["dtype"]:
            raise TypeError(f"assemble: packet {i} has dtype {m['dtype']}, packet 0 has {m0['dtype']}")
        if p.device != packets[0].device:
            raise ValueError(f"assemble: packet {i} is on {p.device}, packet 0 on {packets[0].device}")
        if not m["inv_freq"]:
            raise ValueError(f"assemble: packet {i} carries no RoPE frequencies; it cannot be moved")
    P = 0
    plist = None
    if prefix is not None:
        plist = list(prefix)
        if len(plist) != m0["num_layers"]:
            raise ValueError(f"assemble: prefix has {len(plist)} layers, packets {m0['num_layers']}")
        P = plist[0][0].shape[-2]
    lens = [p.num_tokens for p in packets]
    if starts is None:
        # back to back: a pruned packet still spans the positions of its whole document
        starts, pos = [], P
        for p in packets:
            starts.append(pos)
            pos += len(p.meta["token_ids"])
    starts = [int(s) for s in starts]
    if len(starts) != len(packets):
        raise ValueError(f"assemble: {len(packets)} packets but {len(starts)} starts")
    S = P + sum(lens)
    H, D, L = m0["num_kv_heads"], m0["head_dim"], m0["num_layers"]
    dev, dt = packets[0].device, packets[0].dtype
    if out is None:
        keys = [torch.empty(1, H, S, D, dtype=dt, device=dev) for _ in range(L)]
        values = [torch.empty(1, H, S, D, dtype=dt, device=dev) for _ in range(L)]
    else:
        keys, values = list(out[0]), list(out[1])
        if len(keys) != L or len(values) != L:
            raise ValueError(f"assemble: out must hold {L} key and value tensors")
        for t in keys + values:
            if not isinstance(t, torch.Tensor) or t.dtype != dt or t.device != dev:
                raise TypeError(f"assemble: out tensors must be {dt} on {dev}")
    if plist is not None:
        for l, (k, v) in enumerate(plist):
            keys[l][:, :, :P].copy_(k)
            values[l][:, :, :P].copy_(v)
    _C.assemble([p._h for p in packets], starts, keys, values, P, stream=_stream(keys[0]))
    if out is not None and keys[0].shape[2] > S:
        keys = [k[:, :, :S] for k in keys]
        values = [v[:, :, :S] for v in values]
    spans, pos = [], P
    for n in lens:
        spans.append((pos, pos + n))
        pos += n
    return AssembledKV(keys, values, spans)
