"""The request convention of the vLLM KV Packet connector: which prompt tokens are documents.

A request carries ``kv_transfer_params = {"scrimp_documents": [[start, end], ...]}``: one span of prompt
token indices (end exclusive) per document, back to back (each starts where the previous ends). A span holds one packet's rows:
``n_header`` placeholder tokens, the document's tokens, ``n_trailer`` placeholder tokens (the adapters'
soft tokens have no token id, so each takes one slot of any id; :func:`packet_request` uses
``placeholder_id``). vLLM computes everything outside the spans (prefix, question); the connector writes
the packets' KV into the spans' slots. Plain vLLM code paths read none of this: a request without the
key is served as vLLM serves it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from ...packets.prompt import Prompt

__all__ = ["PARAMS_KEY", "document_spans", "packet_request"]

#: the ``kv_transfer_params`` key that lists a request's document spans
PARAMS_KEY = "scrimp_documents"


def _int(name: str, v, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def packet_request(prompt: Prompt, n_header: int, n_trailer: int, placeholder_id: int = 0) -> Dict[str, Any]:
    """``{"prompt_token_ids": [...], "kv_transfer_params": {...}}`` for ``prompt``: prefix, then each
    document between ``n_header`` and ``n_trailer`` placeholders, then the question.

    Pass ``prompt_token_ids`` as the prompt (``vllm.TokensPrompt`` or the OpenAI completions
    ``prompt`` as a token list) and ``kv_transfer_params`` as is (``SamplingParams(extra_args=
    {"kv_transfer_params": ...})`` or the request body field of the same name)."""
    if not isinstance(prompt, Prompt):
        raise TypeError(f"prompt must be a scrimp.packets.Prompt, got {type(prompt).__name__}")
    _int("n_header", n_header)
    _int("n_trailer", n_trailer)
    _int("placeholder_id", placeholder_id)
    ids: List[int] = list(prompt.prefix)
    spans = []
    for doc in prompt.documents:
        start = len(ids)
        ids += [placeholder_id] * n_header + list(doc) + [placeholder_id] * n_trailer
        spans.append([start, len(ids)])
    ids += list(prompt.question)
    return {"prompt_token_ids": ids, "kv_transfer_params": {PARAMS_KEY: spans}}


def document_spans(params: Optional[dict], n_prompt: int, n_header: int,
                   n_trailer: int) -> Optional[List[Tuple[int, int]]]:
    """The checked document spans of a request's ``kv_transfer_params`` (None: the request names no
    documents). ValueError / TypeError naming the field when they are malformed: not a list of
    ``[start, end]`` int pairs, not back to back, past the prompt, shorter than the adapter
    tokens plus one document token, or reaching the last prompt token (vLLM computes at least one)."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise TypeError(f"kv_transfer_params must be an object, got {type(params).__name__}")
    if PARAMS_KEY not in params:
        return None
    raw = params[PARAMS_KEY]
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise TypeError(f"kv_transfer_params.{PARAMS_KEY} must be a list of [start, end] pairs, "
                        f"got {type(raw).__name__}")
    spans: List[Tuple[int, int]] = []
    prev_end = 0
    for i, sp in enumerate(raw):
        field = f"kv_transfer_params.{PARAMS_KEY}[{i}]"
        if isinstance(sp, (str, bytes)) or not isinstance(sp, Sequence) or len(sp) != 2:
            raise TypeError(f"{field} must be a [start, end] pair, got {sp!r}")
        start, end = _int(f"{field}[0]", sp[0]), _int(f"{field}[1]", sp[1])
        if spans and start != prev_end:
            raise ValueError(f"{field} = [{start}, {end}] does not start where the previous span ends ({prev_end}); "
                             "the documents must follow each other (the connector supplies one run of tokens)")
        if end - start < n_header + n_trailer + 1:
            raise ValueError(f"{field} = [{start}, {end}] holds {end - start} tokens; a packet needs "
                             f"{n_header} header + at least 1 document + {n_trailer} trailer tokens")
        if end >= n_prompt:
            raise ValueError(f"{field} = [{start}, {end}] reaches the end of the {n_prompt}-token prompt; "
                             "the question after the documents needs at least one token")
        spans.append((start, end))
        prev_end = end
    return spans
