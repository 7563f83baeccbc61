"""RoPE re-rotation of cached keys and fused assembly of packets (compiled CPU / CUDA kernels)."""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Union

import torch

from .. import _C

__all__ = ["rerotate_keys", "assemble", "rope_inv_freq", "rope_spec", "RopeSpec", "AssembledKV",
           "STATIC_ROPE_TYPES", "LENGTH_DEPENDENT_ROPE_TYPES", "verify_rerotation"]

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


#: rope types whose frequencies never change with the sequence length: re-rotation is exact anywhere
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: rope types that switch frequencies past a length: re-rotation is exact up to that length only
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


class RopeSpec:
    """How a model rotates its keys, as re-rotation needs it.

    ``inv_freq`` ``[rotary_dim / 2]``: the frequencies (any scaling folded in; partial rotary =
    fewer frequencies than ``head_dim / 2``, the dims past ``rotary_dim`` are not rotated);
    ``layout``: "half" (``rotate_half``, every architecture transformers ships for Llama, Qwen2,
    Qwen3, Mistral and Phi-3); ``attention_scaling``: the factor yarn / longrope multiply cos and sin
    by (a rotation commutes with it, so moving scaled keys is exact); ``max_positions``: for rope
    types whose frequencies switch with the length (dynamic, longrope with distinct short / long
    factors), the number of positions up to which the cached frequencies hold, else None.
    """

    def __init__(self, rope_type: str, inv_freq: torch.Tensor, head_dim: int, layout: str = "half",
                 attention_scaling: float = 1.0, max_positions: Optional[int] = None):
        self.rope_type = rope_type
        self.inv_freq = inv_freq
        self.head_dim = head_dim
        self.layout = layout
        self.attention_scaling = attention_scaling
        self.max_positions = max_positions

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def check_positions(self, n_positions: int) -> None:
        """ValueError when a context spanning ``n_positions`` positions would make the model switch
        frequencies (dynamic, longrope), so that moved keys would no longer equal the model's own."""
        if self.max_positions is not None and n_positions > self.max_positions:
            raise ValueError(
                f"rope type {self.rope_type!r} switches its frequencies past {self.max_positions} positions, and "
                f"this context needs {n_positions}: re-rotated packets would not equal the model's own keys "
                f"(shorten the documents, the question or max_new_tokens)")

    def __repr__(self):
        return (f"RopeSpec({self.rope_type!r}, rotary_dim={self.rotary_dim}, head_dim={self.head_dim}, "
                f"layout={self.layout!r}, attention_scaling={self.attention_scaling:g}, "
                f"max_positions={self.max_positions})")


#: transformers model types whose rotary embedding pairs dims (2i, 2i + 1) (GPT-J style) instead of
#: rotate_half's (i, i + R/2); configs with ``rope_interleave=True`` (DeepSeek-V3) are interleaved too
INTERLEAVED_ROPE_MODEL_TYPES = ("gptj", "codegen", "cohere", "cohere2", "glm", "glm4", "deepseek_v2")


def interleaved_rope(config) -> bool:
    """Whether the model's rotary embedding uses the interleaved (GPT-J) layout."""
    from .. import hf

    c = hf.text_config(config)
    return bool(getattr(c, "rope_interleave", False)) or getattr(c, "model_type", None) in INTERLEAVED_ROPE_MODEL_TYPES


def rope_spec(model) -> RopeSpec:
    """The :class:`RopeSpec` of a transformers causal LM, or ValueError naming a rope type that
    re-rotation cannot move exactly.

    Frequencies come from the rotary module's ``original_inv_freq`` (the ones a context within
    ``max_positions`` uses; dynamic / longrope overwrite ``inv_freq`` during long forwards)."""
    from .. import hf

    if interleaved_rope(model.config):
        raise ValueError(f"rotary layout 'interleaved' (model type {hf.text_config(model.config).model_type!r}) is not "
                         f"supported by KV Packet: packets are only moved for the rotate_half layout ('half')")
    rot = hf.rotary_embedding(model)
    params = hf.rope_parameters(model.config)
    rope_type = str(params.get("rope_type", "default"))
    if rope_type not in STATIC_ROPE_TYPES + LENGTH_DEPENDENT_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported by KV Packet re-rotation; supported: "
                         f"{', '.join(STATIC_ROPE_TYPES + LENGTH_DEPENDENT_ROPE_TYPES)}")
    freq = getattr(rot, "original_inv_freq", None)
    if freq is None:
        freq = getattr(rot, "inv_freq", None)
    if freq is None:
        raise ValueError(f"{type(rot).__name__} has no inv_freq: cannot re-rotate its keys")
    c = hf.text_config(model.config)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if 2 * freq.numel() > head_dim:
        raise ValueError(f"rope: {freq.numel()} frequencies for head_dim {head_dim}")
    limit = None
    if rope_type == "dynamic":
        limit = int(getattr(rot, "original_max_seq_len", None) or c.max_position_embeddings)
    elif rope_type == "longrope" and list(params.get("short_factor", [])) != list(params.get("long_factor", [])):
        limit = int(params.get("original_max_position_embeddings") or c.max_position_embeddings)
    return RopeSpec(rope_type, freq.detach().float().cpu(), head_dim, "half",
                    float(getattr(rot, "attention_scaling", 1.0)), limit)


def rope_inv_freq(model) -> torch.Tensor:
    """The RoPE frequencies ``[rotary_dim / 2]`` a transformers model rotates its keys with."""
    return rope_spec(model).inv_freq


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


@torch.no_grad()
def verify_rerotation(model, spec: Optional[RopeSpec] = None, n_tokens: int = 8, delta: int = 37) -> float:
    """Check on the model itself that moving cached keys is exact: layer-0 keys of ``n_tokens``
    tokens computed at positions ``0..`` and re-rotated by ``delta`` must equal the keys the model
    computes at ``delta..``. Returns the relative error; ValueError naming the rope type when it is
    too large (a rotary layout or frequency rule re-rotation does not reproduce)."""
    from transformers import DynamicCache

    from .. import hf
    from .store import _layers_of

    spec = spec or rope_spec(model)
    dev = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.arange(n_tokens, device=dev)[None] * 7919 % vocab

    def keys_at(start):
        pos = torch.arange(start, start + n_tokens, device=dev)[None]
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{kw: DynamicCache(config=model.config)})
        cache = getattr(out, "cache", None)
        cache = cache if cache is not None else out.past_key_values
        return _layers_of(cache)[0][0].float()

    base, want = keys_at(0), keys_at(delta)
    got = rerotate_keys(base, delta, spec.inv_freq, layout=spec.layout)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    tol = 1e-3 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 5e-2
    if not err <= tol:
        raise ValueError(f"rope type {spec.rope_type!r}, rotary layout {spec.layout!r} "
                         f"({type(hf.rotary_embedding(model)).__name__}): keys moved by re-rotation differ from the "
                         f"model's own by {err:.3g} (relative): a rotary layout or frequency rule KV Packet does not "
                         f"reproduce")
    return err
