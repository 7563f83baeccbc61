"""KV Packet inference on a Hugging Face model: :class:`PacketEngine` fetches (or builds) each
document's packet, re-rotates and assembles them, prefills only the question and decodes greedily."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .adapter import Adapters
from .build import (_new_cache, _prefill_embeds, build_packet_kv, build_pruned_packet_kv, drop_header,
                    packet_positions)
from .model_io import _device, _forward, _kv_layout, _out_cache, _wrong_model_message, check_token_ids, model_fingerprint
from .prompt import Prompt, build_prompt
from .rope import assemble, rerotate_keys, rope_spec, verify_rerotation
from .store import PacketStore, _layers_of


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
