"""LLM annotation of style spans (training data for the boundary predictors).

As in the paper: reasoning traces are cut into chunks of about 60 words; an
annotator model is asked to copy verbatim, as a JSON array of strings in order of
appearance, every transitional, filler or tone-setting phrase, and nothing that is
reasoning, code, a formula or a problem-solving step. Each returned phrase is
located in the chunk (searching forward from the previous match); a reply that is
not a JSON array of strings, or a phrase that cannot be found, discards the chunk
(the official rule; ``strict=False`` keeps the chunk and drops only the missing
phrase). The result is ``{"text", "spans"}`` examples for
:func:`scrimp.tessy.predictor.train_predictor`.

Annotators: any OpenAI-compatible endpoint (:class:`EndpointAnnotator`, chat or
plain completions API) or a local Hugging Face model (:class:`LocalAnnotator`).
"""
from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

__all__ = ["annotation_prompt", "parse_annotation", "AnnotationError", "chunk_words", "EndpointAnnotator",
           "LocalAnnotator", "annotate_texts"]


class AnnotationError(ValueError):
    pass


def annotation_prompt(text: str) -> str:
    """The annotator's instruction for one chunk of reasoning text."""
    return (
        "You are an expert in analysing text.\n\n"
        "Task: list every span of the text below that is a transitional, filler or tone-setting phrase.\n\n"
        "Extract phrases that\n"
        "- express hesitation, tone or attitude (for example \"well\", \"okay\", \"so\", \"let's see\", \"hmm\"),\n"
        "- set up or mark a transition (for example \"first\", \"then\", \"in this case\", \"but if\"),\n"
        "- narrate or connect rather than analyse.\n\n"
        "Do not extract reasoning, deductions or explanations, code, formulas, numbers or problem-solving steps.\n\n"
        "Answer with a JSON array of strings only, for example [\"span 1\", \"span 2\"]:\n"
        "1. copy every span verbatim from the text;\n"
        "2. keep the order in which they appear;\n"
        "3. answer [] when there are none;\n"
        "4. write nothing but the JSON array.\n\n"
        f"<input_text>\n{text}\n</input_text>\n")


def _extract_json_array(output: str):
    s = output.strip()
    # tolerate a code fence or a thinking block around the array
    s = re.sub(r"^.*</think>", "", s, flags=re.S).strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", s, flags=re.S)
    if fence:
        s = fence.group(1).strip()
    try:
        return json.loads(s)
    except ValueError:
        i, j = s.find("["), s.rfind("]")
        if i >= 0 and j > i:
            try:
                return json.loads(s[i:j + 1])
            except ValueError:
                pass
    raise AnnotationError(f"the annotator's reply is not a JSON array: {output[:120]!r}")


def parse_annotation(output: str, text: str, strict: bool = True) -> List[Tuple[int, int]]:
    """Character spans ``(start, end)`` in ``text`` of the phrases listed in the
    annotator's reply, located in order."""
    arr = _extract_json_array(output)
    if not isinstance(arr, list):
        raise AnnotationError(f"the annotator's reply is JSON but not an array: {type(arr).__name__}")
    spans, pos = [], 0
    for item in arr:
        if not isinstance(item, str) or not item:
            raise AnnotationError(f"array element {item!r} is not a non-empty string")
        k = text.find(item, pos)
        if k < 0:
            if strict:
                raise AnnotationError(f"phrase {item!r} is not in the text (after offset {pos})")
            continue
        spans.append((k, k + len(item)))
        pos = k + len(item)
    return spans


def chunk_words(text: str, words: int = 60, n: Optional[int] = None, rng: Optional[random.Random] = None) -> List[str]:
    """Chunks of ``words`` whitespace-separated words: all consecutive chunks, or ``n``
    random windows (the official sampler). Texts shorter than ``words`` are one chunk."""
    toks = text.split(" ")
    if len(toks) <= words:
        return [text]
    if n is None:
        return [" ".join(toks[i:i + words]) for i in range(0, len(toks), words)]
    rng = rng or random.Random(0)
    return [" ".join(toks[s:s + words]) for s in (rng.randint(0, len(toks) - words) for _ in range(n))]


class EndpointAnnotator:
    """Annotate through an OpenAI-compatible endpoint.

    ``api="chat"`` posts to ``/v1/chat/completions`` (the official code uses the chat
    interface), ``api="completions"`` renders ``template`` (``{prompt}``) and posts to
    ``/v1/completions``."""

    def __init__(self, url: str, model: str, api: str = "chat", template: str = "{prompt}",
                 max_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.8, timeout: float = 120.0,
                 concurrency: int = 16, retries: int = 2, api_key: Optional[str] = None):
        if api not in ("chat", "completions"):
            raise ValueError("api must be 'chat' or 'completions'")
        u = url.rstrip("/")
        if not u.endswith("/v1"):
            u += "/v1"
        self.url = u + ("/chat/completions" if api == "chat" else "/completions")
        self.model, self.api, self.template = model, api, template
        self.max_tokens, self.temperature, self.top_p = max_tokens, temperature, top_p
        self.timeout, self.concurrency, self.retries = timeout, concurrency, retries
        self.api_key = api_key

    async def _one(self, client, sem, prompt: str) -> str:
        import httpx
        if self.api == "chat":
            payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        else:
            payload = {"model": self.model, "prompt": self.template.replace("{prompt}", prompt)}
        payload.update(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p)
        last = ""
        async with sem:
            for attempt in range(self.retries + 1):
                try:
                    r = await client.post(self.url, json=payload)
                    if r.status_code == 200:
                        c = r.json()["choices"][0]
                        return c["message"]["content"] if self.api == "chat" else c["text"]
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                    if r.status_code < 500 and r.status_code != 429:
                        break
                except (httpx.TransportError, ValueError, KeyError, IndexError, TypeError) as e:
                    last = f"{type(e).__name__}: {e}"
                await asyncio.sleep(0.5 * 2 ** attempt)
        raise AnnotationError(f"annotator request failed: {last}")

    async def acomplete(self, prompts: Sequence[str]) -> List[object]:
        """Replies (str) or the exception of each failed request."""
        import httpx
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, headers=headers) as client:
            return await asyncio.gather(*[self._one(client, sem, p) for p in prompts], return_exceptions=True)

    def complete(self, prompts: Sequence[str]) -> List[object]:
        return asyncio.run(self.acomplete(prompts))


class LocalAnnotator:
    """Annotate with a local Hugging Face chat model (greedy by default) on ``device`` /
    ``dtype`` (default: where the model is)."""

    def __init__(self, model, tokenizer, max_tokens: int = 512, temperature: float = 0.0, device=None,
                 dtype=None):
        from .backends import GenParams, LocalBackend
        self.backend = LocalBackend(model, tokenizer, name="annotator", device=device, dtype=dtype,
                                    decoding="reprefill")
        self.max_tokens = max_tokens
        self.params = GenParams(temperature, 0.8, 20)

    def complete(self, prompts: Sequence[str]) -> List[object]:
        tok = self.backend.tokenizer
        rendered = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                            add_generation_prompt=True) for p in prompts]
        return [r.text for r in self.backend.generate_batch(rendered, self.max_tokens, self.params)]


def annotate_texts(annotator, texts: Iterable[str], words: int = 60, strict: bool = True,
                   log: Optional[Callable[[str], None]] = None) -> Tuple[List[dict], dict]:
    """Chunk, annotate and locate: returns (examples, report) where examples are
    ``{"text", "spans"}`` and the report counts chunks, parsed, rejected (by reason)."""
    chunks = [c for t in texts for c in chunk_words(t, words) if c.strip()]
    replies = annotator.complete([annotation_prompt(c) for c in chunks])
    examples, rejected = [], {}
    for c, r in zip(chunks, replies):
        try:
            if isinstance(r, BaseException):
                raise r
            spans = parse_annotation(r, c, strict=strict)
        except AnnotationError as e:
            key = str(e).split(":")[0]
            rejected[key] = rejected.get(key, 0) + 1
            if log:
                log(f"rejected chunk: {e}")
            continue
        examples.append({"text": c, "spans": spans})
    return examples, {"chunks": len(chunks), "accepted": len(examples), "rejected": rejected}
