"""The KV Packet method on Hugging Face models: adapters, building packets, inference, baselines.

Packet of a document = the KV cache of ``[header, document, trailer]`` prefilled alone from position 0
(header / trailer: trained soft embeddings shared by all documents). Inference fetches the packets,
re-rotates them to their new offsets in one fused pass (:func:`scrimp.packets.assemble`), prefills
only the question and decodes. Baselines in the same harness: full recompute, no recompute (packets
without adapters), CacheBlend-style selective recompute (r% of tokens with the largest KV deviation)
and EPIC-style recompute (first k tokens of every document).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import numbers
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

from dataclasses import dataclass

import torch
import torch.nn as nn

from .prompt import Prompt, build_prompt
from .rope import assemble, rerotate_keys, rope_inv_freq, rope_spec, verify_rerotation
from .store import PacketStore, _layers_of

#: the ``format`` metadata of an adapter file (safetensors: tensors ``header`` and ``trailer``)
ADAPTER_FORMAT = "scrimp-kv-packet-adapters-v1"

__all__ = ["model_fingerprint", "Adapters", "packet_positions", "build_packet_kv", "build_pruned_packet_kv",
           "PacketEngine", "PACKET_POSITIONS", "Answer", "SelectiveRecompute", "full_answer", "full_first_token_logits", "check_model",
           "REFUSED_FEATURES", "stop_ids", "layer_kv_full_attention", "drop_header", "HEADER_KV", "flops_prefill",
           "flops_rerotation", "method_flops"]


# ----------------------------------------------------------------------------- model helpers

def model_fingerprint(model, as_dtype: Optional[torch.dtype] = None) -> str:
    """SHA-256 over the model's config and weights (sampled for models over 64M parameters).

    The weights are hashed in the dtype they have, so the same checkpoint loaded at float32 and at
    bfloat16 gives two fingerprints (a packet's KV depends on the dtype). ``as_dtype``: hash the
    floating point weights cast to that dtype instead (:func:`model_fingerprint_any_dtype`)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    total = sum(p.numel() for p in model.parameters())
    for name, p in sorted(model.state_dict().items()):
        if as_dtype is not None and p.is_floating_point():
            p = p.detach().to(as_dtype)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        t = p.detach().reshape(-1)
        if total > 64_000_000 and t.numel() > 8192:
            t = torch.cat([t[:4096], t[-4096:]])
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def model_fingerprint_any_dtype(model) -> str:
    """:func:`model_fingerprint` with the weights cast to bfloat16: equal for one checkpoint loaded
    at float32 or bfloat16, so a fingerprint mismatch can be told apart from a dtype mismatch."""
    return model_fingerprint(model, as_dtype=torch.bfloat16)


def model_dtype_name(model) -> str:
    """The dtype of the model's first parameter, e.g. ``"float32"``."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


def _wrong_model_message(what: str, fp: str, dtype: Optional[str], fp_any_dtype: Optional[str], model,
                         mine: str) -> str:
    """The ValueError text for adapters trained for fingerprint ``fp`` (at ``dtype``, whose
    dtype-free fingerprint is ``fp_any_dtype``; None when unknown) used with ``model``."""
    here = model_dtype_name(model)
    if dtype and dtype != here and fp_any_dtype and fp_any_dtype == model_fingerprint_any_dtype(model):
        return (f"{what} were trained for this model at dtype {dtype}, and it is loaded as {here}: a packet's KV "
                f"depends on the dtype; load the model with dtype {dtype} (or train adapters at {here})")
    trained = f" (dtype {dtype})" if dtype else ""
    return f"{what} were trained for model {fp}{trained}, not this model ({mine}, dtype {here})"


def _cache_kw(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model, cache=None, **kw):
    if cache is not None:
        kw[_cache_kw(model)] = cache
    return model(**kw)


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def _embed(model, ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(ids)


def vocab_size(model) -> int:
    """Rows of the model's input embedding table: token ids must be below it."""
    from .. import hf

    return int(hf.input_embeddings(model).num_embeddings)


def check_token_ids(model, prompt, name: str = "prompt") -> None:
    """ValueError naming the part (``prefix``, ``documents[i]``, ``question``, or ``name`` for plain
    ids) whose token ids reach past the model's vocabulary."""
    n = vocab_size(model)
    parts = ([("prefix", prompt.prefix), *((f"documents[{i}]", d) for i, d in enumerate(prompt.documents)),
              ("question", prompt.question)] if isinstance(prompt, Prompt) else [(name, prompt)])
    for part, ids in parts:
        top = max(ids, default=-1)
        if top >= n:
            raise ValueError(f"{part}: token id {top} is outside the model's vocabulary "
                             f"({n} input embeddings, ids 0..{n - 1})")


def _device(model):
    return next(model.parameters()).device


def _kv_layout(model) -> Tuple[int, int, int]:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", c.num_attention_heads), head_dim


# ----------------------------------------------------------------------------- adapters

#: where the header's K/V go: in every packet (the paper), once before the first document, nowhere
HEADER_KV = ("every", "once", "none")


class Adapters(nn.Module):
    """Header and trailer soft embeddings shared by all documents (default 8 + 8, init N(0, 0.02))."""

    def __init__(self, hidden_size: int, n_header: int = 8, n_trailer: int = 8, std: float = 0.02,
                 seed: int = 0, dtype=torch.float32, header_kv: str = "every"):
        super().__init__()
        for name, n in (("n_header", n_header), ("n_trailer", n_trailer)):
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"{name} must be an int, got {type(n).__name__}")
            if n < 0:
                raise ValueError(f"{name} must be >= 0, got {n}")
        if header_kv not in HEADER_KV:
            raise ValueError(f"header_kv must be one of {', '.join(HEADER_KV)}, got {header_kv!r}")
        # Where the header's K/V end up (scrimp's extension; "every" is the paper). Causal attention
        # makes every packet's header K/V the same (the header sees only itself), so it carries no
        # document content: "once" stores no header in the packets and puts one copy, computed once,
        # before the first document; "none" keeps it as build-time context only (every document token
        # attends to it while its packet is prefilled; the question never does). Either way assembly
        # copies and re-rotates n_header fewer tokens per document.
        self.header_kv = header_kv
        g = torch.Generator().manual_seed(seed)
        self.header = nn.Parameter(torch.randn(1, n_header, hidden_size, generator=g, dtype=torch.float32).to(dtype) * std)
        self.trailer = nn.Parameter(torch.randn(1, n_trailer, hidden_size, generator=g, dtype=torch.float32).to(dtype) * std)
        self.fingerprint: Optional[str] = None  # the model these adapters were trained for
        self.model_dtype: Optional[str] = None  # that model's dtype, e.g. "float32"
        self.fingerprint_any_dtype: Optional[str] = None  # model_fingerprint_any_dtype of that model

    @property
    def n_header(self) -> int:
        return self.header.shape[1]

    @property
    def n_trailer(self) -> int:
        return self.trailer.shape[1]

    @property
    def n_header_cached(self) -> int:
        """Header tokens whose K/V each packet keeps (0 unless ``header_kv="every"``)."""
        return self.n_header if self.header_kv == "every" else 0

    @property
    def n_header_shared(self) -> int:
        """Header tokens placed once per context (``header_kv="once"``), else 0."""
        return self.n_header if self.header_kv == "once" else 0

    @property
    def adapter_id(self) -> str:
        """Content hash of the adapter weights and of ``header_kv`` (part of every packet key)."""
        h = hashlib.sha256()
        if self.header_kv != "every":
            h.update(f"header_kv={self.header_kv}".encode())
        for t in (self.header, self.trailer):
            d = t.detach().float().cpu().contiguous()
            h.update(str(tuple(d.shape)).encode())
            h.update(d.numpy().tobytes())
        return "adp-" + h.hexdigest()[:24]

    def wrap(self, doc_embeds: torch.Tensor) -> torch.Tensor:
        """``[1, n, hidden]`` -> ``[1, n_header + n + n_trailer, hidden]``."""
        dt = doc_embeds.dtype
        return torch.cat([self.header.to(dt), doc_embeds, self.trailer.to(dt)], dim=1)

    def save(self, path: str, model=None) -> None:
        from safetensors.torch import save_file

        fp = model_fingerprint(model) if model is not None else self.fingerprint
        if not fp:
            raise ValueError("save: pass the model (or set .fingerprint) so the file records which model it belongs to")
        dtype = model_dtype_name(model) if model is not None else self.model_dtype
        fp_any = model_fingerprint_any_dtype(model) if model is not None else self.fingerprint_any_dtype
        extra = {k: v for k, v in (("model_dtype", dtype), ("model_fingerprint_any_dtype", fp_any)) if v}
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        # adapter_id is a SHA-256 over the weights: stored, it doubles as the file's checksum
        save_file({"header": self.header.detach().cpu().contiguous(), "trailer": self.trailer.detach().cpu().contiguous()},
                  path, metadata={"model_fingerprint": fp, "format": ADAPTER_FORMAT, "adapter_id": self.adapter_id,
                                  "header_kv": self.header_kv, **extra})

    @classmethod
    def load(cls, path: str, model=None) -> "Adapters":
        """Load adapters; with ``model``, a file trained for another model raises ValueError.

        The file is outside data: anything that is not a complete, uncorrupted adapter file
        (unreadable safetensors, missing or extra tensors, bad shapes or dtypes, non-finite values,
        a checksum mismatch) raises ValueError naming the file and the problem."""
        from safetensors import safe_open

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no adapter file at {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                if names != {"header", "trailer"}:
                    raise ValueError(f"tensors {sorted(names)}, expected exactly 'header' and 'trailer'")
                header, trailer = f.get_tensor("header"), f.get_tensor("trailer")
        except ValueError as e:
            raise ValueError(f"{path} is not a scrimp adapter file: {e}") from None
        except Exception as e:  # safetensors' own error type for malformed files
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
        if meta.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
        for name, t in (("header", header), ("trailer", trailer)):
            if t.dim() != 3 or t.shape[0] != 1 or t.shape[2] < 1:
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, expected [1, n_tokens >= 0, hidden]")
            if not t.is_floating_point():
                raise ValueError(f"{path}: {name} has dtype {t.dtype}, expected a floating point dtype")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: {name} holds non-finite values (corrupt)")
        if header.shape[2] != trailer.shape[2]:
            raise ValueError(f"{path}: header hidden size {header.shape[2]} != trailer hidden size {trailer.shape[2]}")
        fp = meta.get("model_fingerprint")
        if not fp:
            raise ValueError(f"{path}: no model_fingerprint in the metadata")
        if model is not None:
            mine = model_fingerprint(model)
            if fp != mine:
                raise ValueError(_wrong_model_message(f"adapters {path}", fp, meta.get("model_dtype"),
                                                      meta.get("model_fingerprint_any_dtype"), model, mine))
            if header.shape[-1] != model.config.hidden_size:
                raise ValueError(f"adapter hidden size {header.shape[-1]} != model hidden size {model.config.hidden_size}")
        header_kv = meta.get("header_kv", "every")  # files written before the option keep it in every packet
        if header_kv not in HEADER_KV:
            raise ValueError(f"{path}: header_kv metadata {header_kv!r}, expected one of {', '.join(HEADER_KV)}")
        a = cls(header.shape[-1], header.shape[1], trailer.shape[1], header_kv=header_kv)
        with torch.no_grad():
            a.header.copy_(header)
            a.trailer.copy_(trailer)
        if meta.get("adapter_id") != a.adapter_id:
            raise ValueError(f"{path}: checksum mismatch (stored adapter_id {meta.get('adapter_id')!r}, "
                             f"weights hash to {a.adapter_id!r}): the file is corrupt")
        a.fingerprint = fp
        a.model_dtype = meta.get("model_dtype")
        a.fingerprint_any_dtype = meta.get("model_fingerprint_any_dtype")
        return a


# ----------------------------------------------------------------------------- packets

def packet_positions(prefix_len: int, doc_lens: Sequence[int], n_header: int = 0) -> Tuple[List[int], int]:
    """(start position of each packet, position of the first question token).

    Every document token keeps the position it has in the plain prompt, shifted by ``n_header``:
    packet i (``[header, doc_i, trailer]``) starts ``n_header`` positions before its document, so
    its header overlaps the previous packet's trailer positions (RoPE attention only sees relative
    positions; repeated positions are harmless). The context then spans ``n_header`` more positions
    than the plain prompt, not ``(n_header + n_trailer)`` per document: with 17 documents of a
    2,048-token prompt back-to-back packets would push the question 272 positions further, past
    where the model was trained."""
    for name, v in (("prefix_len", prefix_len), ("n_header", n_header), *(("doc_lens[]", d) for d in doc_lens)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"packet_positions: {name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"packet_positions: {name} must be >= 0, got {v}")
    starts, pos = [], prefix_len + n_header
    for n in doc_lens:
        starts.append(pos - n_header)
        pos += n
    return starts, pos


@torch.no_grad()
def _wrapped_prefill(model, doc_ids: Sequence[int], adapters: Optional[Adapters], hidden_states: bool = False):
    """Prefill ``[header, doc, trailer]`` alone from position 0. Returns (per-layer (K, V), each
    ``[1, kv_heads, tokens, head_dim]``; with ``hidden_states`` every layer's input ``[1, tokens, hidden]``,
    else None; positions ``[1, tokens]``)."""
    dev = _device(model)
    ids = torch.tensor([list(doc_ids)], dtype=torch.long, device=dev)
    x = _embed(model, ids)
    if adapters is not None:
        x = adapters.wrap(x)
    return _prefill_embeds(model, x, hidden_states)


@torch.no_grad()
def _prefill_embeds(model, x: torch.Tensor, hidden_states: bool = False):
    """Prefill input embeddings ``x`` [1, tokens, hidden] alone from position 0; returns as
    :func:`_wrapped_prefill`."""
    pos = torch.arange(x.shape[1], device=x.device)[None]
    out = _forward(model, inputs_embeds=x, position_ids=pos, use_cache=True, cache=_new_cache(model),
                   output_hidden_states=hidden_states)
    return _layers_of(_out_cache(out)), out.hidden_states, pos


def build_packet_kv(model, doc_ids: Sequence[int], adapters: Optional[Adapters] = None):
    """Prefill ``[header, doc, trailer]`` alone from position 0; returns (K, V) per layer, each
    ``[1, kv_heads, tokens, head_dim]``."""
    return _wrapped_prefill(model, doc_ids, adapters)[0]


def build_pruned_packet_kv(model, doc_ids: Sequence[int], adapters: Optional[Adapters], pruning):
    """Like :func:`build_packet_kv`, then keep only every adapter token and the best-scored document
    tokens under ``pruning`` (a :class:`~scrimp.packets.prune.Pruning`). Returns ``(layers, kept)``:
    the kept tokens' (K, V) per layer, ``[1, kv_heads, len(kept), head_dim]``, and their indices into
    the wrapped packet, in order."""
    from .prune import Pruning, attention_scores, key_norm_scores

    if not isinstance(pruning, Pruning):
        raise TypeError(f"pruning must be a scrimp.packets.prune.Pruning, got {type(pruning).__name__}")
    layers, hidden, pos = _wrapped_prefill(model, doc_ids, adapters, hidden_states=pruning.score == "attention")
    nh = adapters.n_header if adapters is not None else 0
    nt = adapters.n_trailer if adapters is not None else 0
    start, end = nh, nh + len(doc_ids)
    if pruning.score == "key_norm":
        scores = key_norm_scores(layers, start, end)
    else:
        scores = attention_scores(model, hidden, layers, pos, start, end, pruning.window, nt)
    kept = pruning.kept(scores, nh, nt)
    idx = torch.tensor(kept, dtype=torch.long, device=pos.device)
    return [(k.index_select(2, idx), v.index_select(2, idx)) for k, v in layers], kept


def drop_header(layers, kept: Optional[List[int]], n_header: int, n_tokens: int):
    """Remove the header rows from a built packet. ``layers``: (K, V) per layer, ``[1, kv_heads, T, head_dim]``
    holding the wrapped tokens ``kept`` (None = all ``n_tokens``). Returns ``(layers, kept)`` with only the
    document and trailer tokens, ``kept`` their indices into the wrapped packet."""
    for name, v in (("n_header", n_header), ("n_tokens", n_tokens)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"drop_header: {name} must be an int, got {type(v).__name__}")
    if not 0 <= n_header <= n_tokens:
        raise ValueError(f"drop_header: expected 0 <= n_header <= n_tokens, got {n_header} and {n_tokens}")
    kept = list(range(n_tokens)) if kept is None else [int(i) for i in kept]
    if any(b <= a for a, b in zip(kept, kept[1:])) or (kept and not 0 <= kept[0] <= kept[-1] < n_tokens):
        raise ValueError(f"drop_header: kept must be strictly increasing indices in [0, {n_tokens})")
    if not layers or any(k.shape[2] != len(kept) or v.shape[2] != len(kept) for k, v in layers):
        raise ValueError(f"drop_header: expected (K, V) per layer holding {len(kept)} tokens (dim 2), got "
                         f"{[tuple(k.shape) for k, _ in layers]}")
    rows = [j for j, i in enumerate(kept) if i >= n_header]
    if len(rows) == len(kept):
        return layers, kept
    idx = torch.tensor(rows, dtype=torch.long, device=layers[0][0].device)
    return [(k.index_select(2, idx), v.index_select(2, idx)) for k, v in layers], [kept[j] for j in rows]


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def stop_ids(model, tokenizer=None) -> frozenset:
    """Token ids that end a generation: the generation config's ``eos_token_id`` (an id or a list,
    as Llama-3 instruct checkpoints have) and the tokenizer's eos token."""
    gc = getattr(model, "generation_config", None)
    return frozenset(token_id_list(getattr(gc, "eos_token_id", None)) + token_id_list(getattr(tokenizer, "eos_token_id", None)))


def token_id_list(src) -> List[int]:
    """Token ids from an ``eos_token_id``-like value: None, an integer (Python, numpy or a 0-d
    tensor), or a list / tuple / tensor / array of them."""
    import operator

    if src is None:
        return []
    if isinstance(src, torch.Tensor):
        return [int(i) for i in src.reshape(-1).tolist()]
    try:
        return [operator.index(src)]
    except TypeError:
        pass
    if hasattr(src, "tolist") and not isinstance(src, (list, tuple)):  # numpy arrays
        src = src.tolist()
        if not isinstance(src, list):
            src = [src]
    return [operator.index(i) for i in src]


@torch.no_grad()
def _greedy_from(model, cache, first_ids: List[int], start_pos: int, max_new_tokens: int, eos_ids, t0=None):
    """Prefill ``first_ids`` at ``start_pos`` on top of ``cache``, then greedy-decode. ``eos_ids``: an
    id, a set of ids or None. Returns (new token ids, seconds to the first token measured from ``t0``)."""
    stops = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
    dev = _device(model)
    ids = torch.tensor([first_ids], dtype=torch.long, device=dev)
    pos = start_pos
    new: List[int] = []
    ttft = None
    for step in range(max_new_tokens):
        n = ids.shape[1]
        out = _forward(model, input_ids=ids, position_ids=torch.arange(pos, pos + n, device=dev)[None],
                       cache=cache, use_cache=True, logits_to_keep=1)
        cache = _out_cache(out)
        nxt = int(out.logits[0, -1].argmax())
        if ttft is None and t0 is not None:
            ttft = time.perf_counter() - t0
        new.append(nxt)
        pos += n
        if nxt in stops:
            break
        ids = torch.tensor([[nxt]], dtype=torch.long, device=dev)
    return new, ttft


#: model features KV Packet refuses (by :func:`scrimp.hf.refuse_features`): packets are prefilled alone
#: and moved, which a sliding window, non-attention or RoPE-less layers break; the attention-score
#: pruning and CacheBlend's deviation compute softmax attention by hand, without soft-capping or sinks
REFUSED_FEATURES = ("sliding_window", "hybrid_layers", "no_rope", "attn_logit_softcapping", "attention_sinks")


def check_model(model) -> None:
    """ValueError naming any feature of ``model`` that KV Packet cannot run exactly (see
    :data:`REFUSED_FEATURES`) or a rope type re-rotation cannot move (see :func:`rope_spec`)."""
    from .. import hf

    hf.refuse_features(model.config, "KV Packet", refuse=REFUSED_FEATURES, model=model)
    rope_spec(model)


@dataclass
class Answer:
    """What :meth:`PacketEngine.answer` returns."""
    token_ids: List[int]  # generated ids (the final stop token included when produced)
    text: Optional[str]  # decoded without special tokens (None without a tokenizer)
    ttft_s: float  # seconds from the request to the first generated token (packets already stored)
    total_s: float  # seconds from the request to the last token
    prompt: Prompt  # the token ids the request was turned into
    packets_built: int  # packets this request had to build (store misses; offline work, not in ttft_s)
    packets_reused: int  # packets served by the store


#: where :class:`PacketEngine` places the packets: ``"overlap"`` keeps every document token at its plain-prompt
#: position shifted by the header length (a packet's header overlaps the previous trailer's positions);
#: ``"slots"`` puts every packet row (header, document, trailer) at its own position, back to back after the
#: prefix, as a paged engine (vLLM) lays out one token per slot
PACKET_POSITIONS = ("overlap", "slots")

#: (model fingerprint, rope spec) pairs :func:`verify_rerotation` has passed in this process
_VERIFIED_ROPE: set = set()


class PacketEngine:
    """KV Packet inference (``adapters`` given) or the no-recompute baseline (``adapters=None``)::

        eng = PacketEngine(model, tokenizer, Adapters.load("adapters.safetensors", model))
        out = eng.answer(["first document ...", "second document ..."], "What is ...?")
        out.text, out.token_ids, out.ttft_s

    Packets missing from the store are built on first use (offline work, not part of the time to
    first token); the same document in another prompt is a store hit (key = model fingerprint +
    adapter id + document tokens). Models with features KV Packet cannot run exactly are refused
    (:func:`check_model`); the model's rotary layout is checked on the model itself
    (:func:`~scrimp.packets.rope.verify_rerotation`) once per model fingerprint and rope spec, by
    every engine: a layout or frequency rule re-rotation does not reproduce is always refused.
    """

    def __init__(self, model, tokenizer=None, adapters: Optional[Adapters] = None, store: Optional[PacketStore] = None,
                 pruning=None, positions: str = "overlap"):
        from .prune import Pruning

        if positions not in PACKET_POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(PACKET_POSITIONS)}, got {positions!r}")
        if positions == "slots" and pruning is not None:
            raise ValueError('positions="slots" places every packet row in its own slot; pruned packets are not '
                             'supported there (pruning=None)')
        if positions == "slots" and adapters is not None and adapters.header_kv != "every":
            raise ValueError(f'positions="slots" needs adapters with header_kv="every", got {adapters.header_kv!r}')
        self.positions = positions
        if pruning is not None and not isinstance(pruning, Pruning):
            raise TypeError(f"pruning must be a scrimp.packets.prune.Pruning or None, got {type(pruning).__name__}")
        if adapters is not None and not isinstance(adapters, Adapters):
            raise TypeError(f"adapters must be scrimp.packets.method.Adapters or None, got {type(adapters).__name__}")
        check_model(model)
        self.pruning = pruning
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.store = store if store is not None else PacketStore(host_bytes=2 << 30)
        self.fingerprint = model_fingerprint(model)
        if adapters is not None and adapters.fingerprint not in (None, self.fingerprint):
            raise ValueError(_wrong_model_message("the adapters", adapters.fingerprint, adapters.model_dtype,
                                                  adapters.fingerprint_any_dtype, model, self.fingerprint))
        if adapters is not None and adapters.header.shape[-1] != model.config.hidden_size:
            raise ValueError(f"adapter hidden size {adapters.header.shape[-1]} != model hidden size "
                             f"{model.config.hidden_size}")
        self.adapter_id = adapters.adapter_id if adapters is not None else "none"
        self.rope = rope_spec(model)
        checked = (self.fingerprint, repr(self.rope), tuple(self.rope.inv_freq.tolist()))
        if checked not in _VERIFIED_ROPE:
            verify_rerotation(model, self.rope)
            _VERIFIED_ROPE.add(checked)
        self.inv_freq = self.rope.inv_freq
        self.layout = _kv_layout(model)
        self.ttfts: List[float] = []
        self.built = 0
        self._prefix_kv: Dict[tuple, list] = {}  # the shared prompt prefix (e.g. <bos>), computed once
        self._header_kv: Optional[list] = None  # header_kv="once": the header's K/V at positions 0.., computed once

    # --- requests in plain terms

    def prompt(self, documents, question, **kw) -> Prompt:
        """:func:`~scrimp.packets.prompt.build_prompt` with this engine's tokenizer."""
        if self.tokenizer is None and (isinstance(question, str) or any(isinstance(d, str) for d in documents)):
            raise ValueError("text documents or questions need a tokenizer: PacketEngine(model, tokenizer, ...)")
        return build_prompt(self.tokenizer, documents, question, **kw)

    def answer(self, documents=None, question=None, *, prompt: Optional[Prompt] = None, max_new_tokens: int = 64,
               **prompt_kw) -> Answer:
        """Answer ``question`` over ``documents`` (strings or token-id lists; see
        :func:`~scrimp.packets.prompt.build_prompt` for ``prompt_kw``), or a ready :class:`Prompt`."""
        if prompt is None:
            if documents is None or question is None:
                raise ValueError("give documents and a question, or prompt=")
            prompt = self.prompt(documents, question, **prompt_kw)
        elif not isinstance(prompt, Prompt):
            raise TypeError(f"prompt must be a scrimp.packets.Prompt, got {type(prompt).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        built0 = self.built
        self.warm(prompt)
        built = self.built - built0
        t0 = time.perf_counter()
        cache, n, question_ids, *_ = self.prepare(prompt, max_new_tokens)
        new, ttft = _greedy_from(self.model, cache, question_ids, n, max_new_tokens,
                                 stop_ids(self.model, self.tokenizer), t0)
        total = time.perf_counter() - t0
        self.ttfts.append(ttft)
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer is not None else None
        return Answer(new, text, ttft, total, prompt, built, len(prompt.documents) - built)

    # --- packets

    def _packet_tokens(self, doc: List[int]) -> List[int]:
        if self.adapters is None:
            return list(doc)
        return [-1] * self.adapters.n_header + list(doc) + [-2] * self.adapters.n_trailer

    def packet(self, doc: List[int]):
        """The packet of a document (built and stored on a miss)."""
        from .store import packet_key

        check_token_ids(self.model, doc, "document")
        toks = self._packet_tokens(doc)
        no_header = self.adapters is not None and self.adapters.header_kv != "every"
        # a packet without its header rows holds a subset of its tokens: the store needs a rule for that
        rule = "+".join(r for r in (self.pruning.rule if self.pruning is not None else "",
                                    "no-header" if no_header else "") if r)
        key = packet_key(toks, self.fingerprint, self.adapter_id, rule)
        L, H, D = self.layout
        dev = _device(self.model)
        p = self.store.get(key, device=dev, model_fingerprint=self.fingerprint, adapter_id=self.adapter_id,
                           num_layers=L, num_kv_heads=H, head_dim=D)
        if p is None:
            self.rope.check_positions(len(toks))
            if self.pruning is None:
                kv, kept = build_packet_kv(self.model, doc, self.adapters), None
            else:
                kv, kept = build_pruned_packet_kv(self.model, doc, self.adapters, self.pruning)
            if no_header:
                kv, kept = drop_header(kv, kept, self.adapters.n_header, len(toks))
            self.store.put(kv, toks, model_fingerprint=self.fingerprint, adapter_id=self.adapter_id,
                           inv_freq=self.inv_freq, kept=kept, pruning=rule)
            self.built += 1
            p = self.store.get(key, device=dev)
        return p

    @torch.no_grad()
    def prepare(self, prompt: Prompt, max_new_tokens: int = 0):
        """(cache, position of the first question token, question ids, assembled KV, documents, prefix)
        for a :class:`Prompt`. Without adapters the position equals the cache length. ValueError when
        the context plus the question and ``max_new_tokens`` would pass the positions the rope type
        keeps its frequencies for (dynamic, longrope)."""
        if not isinstance(prompt, Prompt):
            raise TypeError(f"prepare: expected a scrimp.packets.Prompt, got {type(prompt).__name__}")
        check_token_ids(self.model, prompt)
        prefix, docs, question = prompt.prefix, prompt.documents, prompt.question
        n_header = self.adapters.n_header if self.adapters is not None else 0
        self.rope.check_positions(prompt.context_len + n_header + len(question) + max_new_tokens)
        dev = _device(self.model)
        pre = self._prefix_kv.get(tuple(prefix))
        if prefix and pre is None:
            out = _forward(self.model, input_ids=torch.tensor([prefix], device=dev),
                           position_ids=torch.arange(len(prefix), device=dev)[None], use_cache=True,
                           cache=_new_cache(self.model))
            pre = [(k.clone(), v.clone()) for k, v in _layers_of(_out_cache(out))]
            self._prefix_kv[tuple(prefix)] = pre
        packets = [self.packet(d) for d in docs]
        if packets and self.positions == "slots":
            kv = assemble(packets, prefix=pre)  # back to back: every row at its own position
            cache, n = kv.to_cache(self.model.config), kv.keys[0].shape[2]
        elif packets:
            starts, n = packet_positions(len(prefix), [len(d) for d in docs], n_header)
            if self.adapters is not None and self.adapters.header_kv == "once" and n_header:
                pre = self._with_shared_header(pre, starts[0])
            kv = assemble(packets, starts, prefix=pre)
            cache = kv.to_cache(self.model.config)
        else:
            kv = None
            from .rope import AssembledKV
            cache = (AssembledKV([k.clone() for k, _ in pre], [v.clone() for _, v in pre], []).to_cache(self.model.config)
                     if pre else _new_cache(self.model))
            n = len(prefix)
        for p in packets:
            p.release()  # the assembled cache is a copy; the store may evict them again
        return cache, n, question, kv, docs, prefix

    def _with_shared_header(self, pre, start: int):
        """``pre`` (per-layer prefix K/V, or None) followed by the one header copy of
        ``header_kv="once"``, moved to positions ``start..``: the header rows every packet would hold
        (the header sees only itself), computed once and re-rotated here."""
        if self._header_kv is None:
            emb = self.model.get_input_embeddings().weight
            layers, _, _ = _prefill_embeds(self.model, self.adapters.header.to(device=emb.device, dtype=emb.dtype))
            self._header_kv = [(k.clone(), v.clone()) for k, v in layers]
        moved = [(rerotate_keys(k, start, self.inv_freq, layout=self.rope.layout), v) for k, v in self._header_kv]
        if not pre:
            return moved
        return [(torch.cat([pk, hk], dim=2), torch.cat([pv, hv], dim=2)) for (pk, pv), (hk, hv) in zip(pre, moved)]

    def warm(self, prompt: Prompt) -> None:
        """Build and store the packets of a prompt's documents (offline work)."""
        check_token_ids(self.model, prompt)
        for d in prompt.documents:
            self.packet(d).release()

    @torch.no_grad()
    def first_token_logits(self, prompt: Prompt) -> torch.Tensor:
        """Logits ``[vocab]`` of the first answer token (for fidelity against full recompute)."""
        cache, n, question, *_ = self.prepare(prompt)
        return _question_logits(self.model, cache, n, question)


def _question_logits(model, cache, n, question) -> torch.Tensor:
    dev = _device(model)
    out = _forward(model, input_ids=torch.tensor([question], device=dev),
                   position_ids=torch.arange(n, n + len(question), device=dev)[None], cache=cache, use_cache=True,
                   logits_to_keep=1)
    return out.logits[0, -1].float()


def _plain_ids(model, prompt) -> List[int]:
    """The plain prompt's ids, checked against the model's vocabulary."""
    if isinstance(prompt, Prompt):
        check_token_ids(model, prompt)
        return prompt.ids
    from .prompt import _ids

    ids = _ids("prompt", prompt)
    check_token_ids(model, ids)
    return ids


@torch.no_grad()
def full_first_token_logits(model, prompt) -> torch.Tensor:
    """Logits ``[vocab]`` after the plain prompt (a :class:`Prompt` or token ids) with full attention."""
    dev = _device(model)
    return model(input_ids=torch.tensor([_plain_ids(model, prompt)], device=dev), logits_to_keep=1).logits[0, -1].float()


@torch.no_grad()
def full_answer(model, prompt, max_new_tokens: int = 64, tokenizer=None) -> Tuple[List[int], float]:
    """The full-recompute anchor: prefill the whole plain prompt, greedy decode. Returns (new ids,
    seconds to the first token)."""
    t0 = time.perf_counter()
    return _greedy_from(model, _new_cache(model), _plain_ids(model, prompt), 0, max_new_tokens,
                        stop_ids(model, tokenizer), t0)


# ----------------------------------------------------------------------------- selective recompute

@torch.no_grad()
def _recompute_positions(model, cache, seq_ids: List[int], sel: List[int], n: int):
    """Recompute the KV of the tokens at sequence positions ``sel`` through every layer, attending to
    the cached KV of all other tokens (CacheBlend's partial update), and write it into ``cache``."""
    if not sel:
        return cache
    dev = _device(model)
    sel_t = torch.tensor(sel, dtype=torch.long, device=dev)
    r = len(sel)
    x = _embed(model, torch.tensor([[seq_ids[i] for i in sel]], device=dev))
    allowed = torch.zeros(r, n + r, dtype=torch.bool, device=dev)
    past = torch.arange(n, device=dev)
    stale = torch.zeros(n, dtype=torch.bool, device=dev)
    stale[sel_t] = True
    allowed[:, :n] = (past[None, :] <= sel_t[:, None]) & ~stale[None, :]
    allowed[:, n:] = sel_t[None, :] <= sel_t[:, None]
    out = _forward(model, inputs_embeds=x, position_ids=sel_t[None], cache=cache, use_cache=True,
                   attention_mask=allowed[None, None], logits_to_keep=1)
    cache = _out_cache(out)
    pairs = []
    for layer in _layers_of(cache):
        k, v = layer
        k = k[:, :, :n].clone()
        v = v[:, :, :n].clone()
        k[:, :, sel_t] = layer[0][:, :, n:]
        v[:, :, sel_t] = layer[1][:, :, n:]
        pairs.append((k, v))
    from .rope import AssembledKV
    return AssembledKV([k for k, _ in pairs], [v for _, v in pairs], []).to_cache(model.config)


class _StopForward(Exception):
    pass


@torch.no_grad()
def layer_kv_full_attention(model, seq_ids: List[int], layer_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(K, V) ``[1, kv_heads, n, head_dim]`` of decoder layer ``layer_index`` for ``seq_ids`` with full
    causal attention, running only layers ``0..layer_index`` (the model's own forward, stopped once
    that layer has written its cache): works for any architecture :mod:`scrimp.hf` knows."""
    from .. import hf

    layers = hf.decoder_layers(model)
    if not 0 <= layer_index < len(layers):
        raise ValueError(f"layer_index must be in [0, {len(layers)}), got {layer_index}")
    dev = _device(model)
    cache = _new_cache(model)

    def stop(*_):
        raise _StopForward

    # stop once the layer's attention has run (at its MLP), else at the next layer or the final norm
    nxt = getattr(layers[layer_index], "mlp", None)
    if nxt is None:
        nxt = layers[layer_index + 1] if layer_index + 1 < len(layers) else getattr(hf.base_model(model), "norm", None)
    handle = nxt.register_forward_pre_hook(stop) if nxt is not None else None
    try:
        _forward(model, input_ids=torch.tensor([list(seq_ids)], device=dev),
                 position_ids=torch.arange(len(seq_ids), device=dev)[None], cache=cache, use_cache=True,
                 logits_to_keep=1)
    except _StopForward:
        pass
    finally:
        if handle is not None:
            handle.remove()
    k, v = _layers_of(cache)[layer_index]
    return k, v


@torch.no_grad()
def _kv_deviation(model, cache, seq_ids: List[int], layer_index: int = 1) -> torch.Tensor:
    """Per-token squared deviation ``[n]`` between the cached K/V of ``layer_index`` and the K/V
    computed with full attention (running layers ``<= layer_index`` over all tokens, as CacheBlend does)."""
    n = len(seq_ids)
    layer_index = min(layer_index, model.config.num_hidden_layers - 1)
    k, v = layer_kv_full_attention(model, seq_ids, layer_index)
    ck, cv = _layers_of(cache)[layer_index]
    return ((k.float() - ck[:, :, :n].float()) ** 2).sum(dim=(0, 1, 3)) + \
        ((v.float() - cv[:, :, :n].float()) ** 2).sum(dim=(0, 1, 3))


class SelectiveRecompute:
    """CacheBlend-style (``ratio``: recompute that fraction of document tokens with the largest KV
    deviation at layer 1) or EPIC-style (``first_k``: recompute the first k tokens of every document)
    on top of the no-recompute assembly (packets without adapters)."""

    def __init__(self, model, tokenizer=None, ratio: Optional[float] = None, first_k: Optional[int] = None,
                 store: Optional[PacketStore] = None):
        if (ratio is None) == (first_k is None):
            raise ValueError("give exactly one of ratio (CacheBlend) or first_k (EPIC)")
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
                raise TypeError(f"ratio must be a real number, got {type(ratio).__name__}")
            if not 0 <= ratio <= 1:  # NaN fails too
                raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if first_k is not None:
            if isinstance(first_k, bool) or not isinstance(first_k, int):
                raise TypeError(f"first_k must be an int, got {type(first_k).__name__}")
            if first_k < 0:
                raise ValueError(f"first_k must be >= 0, got {first_k}")
        self.engine = PacketEngine(model, tokenizer, None, store)
        self.ratio, self.first_k = ratio, first_k
        self.ttfts: List[float] = []
        self.recomputed: List[int] = []

    @torch.no_grad()
    def _prepared(self, prompt: Prompt, max_new_tokens: int = 0):
        eng = self.engine
        model = eng.model
        cache, n, question, kv, docs, prefix = eng.prepare(prompt, max_new_tokens)
        seq_ids = list(prefix) + [t for d in docs for t in d]
        if self.ratio is not None:
            dev = _kv_deviation(model, cache, seq_ids)
            dev[: len(prefix)] = -1  # the prefix was computed fresh
            r = int(round(self.ratio * (n - len(prefix))))
            sel = sorted(torch.topk(dev, r).indices.tolist()) if r > 0 else []
        else:
            sel, pos = [], len(prefix)
            for d in docs:
                sel.extend(range(pos, pos + min(self.first_k, len(d))))
                pos += len(d)
        cache = _recompute_positions(model, cache, seq_ids, sel, n)
        return cache, n, question, len(sel)

    @torch.no_grad()
    def first_token_logits(self, prompt: Prompt) -> torch.Tensor:
        cache, n, question, _ = self._prepared(prompt)
        return _question_logits(self.engine.model, cache, n, question)

    def answer(self, prompt: Prompt, max_new_tokens: int = 64) -> Tuple[List[int], float]:
        """(new ids, seconds to the first token) for a :class:`Prompt` (packets stored beforehand)."""
        self.engine.warm(prompt)
        t0 = time.perf_counter()
        cache, n, question, r = self._prepared(prompt, max_new_tokens)
        self.recomputed.append(r)
        new, ttft = _greedy_from(self.engine.model, cache, question, n, max_new_tokens,
                                 stop_ids(self.engine.model, self.engine.tokenizer), t0)
        self.ttfts.append(ttft)
        return new, ttft


# ----------------------------------------------------------------------------- FLOPs

def flops_prefill(config, n_new: int, n_past: int = 0, layers: Optional[int] = None) -> float:
    """Analytic FLOPs (2 per multiply-add) to run ``n_new`` tokens through ``layers`` decoder layers
    attending to ``n_past`` cached tokens plus themselves (causally): Q/K/V/O projections, attention
    scores and weighted sum, gated MLP. Embedding lookups, norms and the LM head are not counted."""
    c = config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    qd, kvd = c.num_attention_heads * hd, getattr(c, "num_key_value_heads", c.num_attention_heads) * hd
    L = c.num_hidden_layers if layers is None else layers
    proj = 2 * n_new * (c.hidden_size * (qd + 2 * kvd) + qd * c.hidden_size)
    mlp = 2 * n_new * 3 * c.hidden_size * c.intermediate_size
    ctx = n_new * n_past + n_new * (n_new + 1) / 2  # attended (query, key) pairs
    attn = 2 * 2 * ctx * qd
    return float(L * (proj + mlp + attn))


def flops_rerotation(config, seq: int) -> float:
    """Re-rotation FLOPs as the KV Packet paper counts them: (4 + 3 * kv_heads) * seq * rope_dim per layer."""
    c = config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    from .. import hf

    rope_dim = int(hd * float(hf.rope_parameters(c).get("partial_rotary_factor", 1.0) or 1.0))
    kvh = getattr(c, "num_key_value_heads", c.num_attention_heads)
    return float(c.num_hidden_layers * (4 + 3 * kvh) * seq * rope_dim)


def method_flops(config, method: str, doc_lens: Sequence[int], prefix_len: int = 1, ratio: float = 0.0,
                 first_k: int = 0, n_header: int = 0, n_trailer: int = 0, n_shared: int = 0) -> float:
    """FLOPs spent preparing the context cache (the question prefill and decoding are the same for
    every method and not counted). Methods: full, none (no recompute), kvpacket, cacheblend, epic.
    For kvpacket: ``n_header`` / ``n_trailer`` adapter tokens re-rotated with every packet, ``n_shared``
    more once per context (a shared header)."""
    n_docs = sum(doc_lens)
    if method == "full":
        return flops_prefill(config, prefix_len + n_docs)
    if method == "kvpacket":
        return flops_rerotation(config, n_docs + len(doc_lens) * (n_header + n_trailer) + n_shared)
    rot = flops_rerotation(config, n_docs)
    if method == "none":
        return rot
    S = prefix_len + n_docs
    if method == "cacheblend":
        r = int(round(ratio * n_docs))
        select = flops_prefill(config, S, layers=1) + 2 * S * config.hidden_size * 2 * (
            getattr(config, "num_key_value_heads", config.num_attention_heads)
            * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads))
        return rot + select + flops_prefill(config, r, n_past=S - r)
    if method == "epic":
        r = sum(min(first_k, n) for n in doc_lens)
        return rot + flops_prefill(config, r, n_past=S - r)
    raise ValueError(f"unknown method {method!r}")
