"""Generation backends for TESSY: text in, text out.

* :class:`LocalBackend` - a Hugging Face causal LM in this process. Concurrent
  ``generate`` calls (one per problem in flight) are gathered by a micro-batcher
  into one left-padded, batched ``model.generate`` call, run in a worker thread.
* :class:`RemoteBackend` - one or more OpenAI-compatible ``/v1/completions``
  endpoints (vLLM, SGLang, :mod:`scrimp.tessy.server`): async HTTP with a
  concurrency limit, timeouts, retries with exponential backoff, and the least
  loaded endpoint chosen per request.

Teacher and student may use different tokenizers and chat templates: the loop
hands each backend the prompt *text* and receives text.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

__all__ = ["GenParams", "GenResult", "Backend", "LocalBackend", "RemoteBackend", "BackendError",
           "MicroBatcher", "compute_executor"]


class BackendError(RuntimeError):
    """A request that failed for good (after retries), with a readable reason."""


@dataclass
class GenParams:
    """Sampling parameters (the official code: temperature 0.7, top_p 0.8, top_k 20).
    ``temperature == 0`` means greedy decoding."""
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20

    def validate(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        return self


@dataclass
class GenResult:
    """``text``: the continuation; ``finish_reason``: ``stop`` (end of sequence) or
    ``length``; ``n_tokens``: generated tokens as the model counted them."""
    text: str
    finish_reason: str = "length"
    n_tokens: Optional[int] = None
    endpoint: Optional[str] = None


class Backend:
    """A model that continues prompt text. ``tokenizer`` (optional) gives its chat
    template and counts its tokens."""
    name: str = "model"
    tokenizer = None

    async def generate(self, prompt: str, max_tokens: int, params: GenParams) -> GenResult:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name}


# ----------------------------------------------------------------------------- micro-batching

_EXECUTOR = {}


def compute_executor() -> concurrent.futures.ThreadPoolExecutor:
    """One worker thread shared by all in-process compute (models and predictors),
    so torch calls never run concurrently with each other."""
    if "ex" not in _EXECUTOR:
        _EXECUTOR["ex"] = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrimp-tessy")
    return _EXECUTOR["ex"]


class MicroBatcher:
    """Gathers concurrent ``submit(item)`` calls into batches for ``fn(items) -> results``.

    The first waiting item opens a batch; the batcher then yields to the event loop
    ``gather_rounds`` times so that other coroutines can add theirs (up to
    ``max_batch``), and runs ``fn`` in the compute thread. Each batcher belongs to
    the event loop it was first used in."""

    def __init__(self, fn: Callable[[list], list], max_batch: int = 64, gather_rounds: int = 3):
        self.fn = fn
        self.max_batch = max(1, int(max_batch))
        self.gather_rounds = gather_rounds
        self._state = {}  # event loop -> [queue, task]: one batcher may serve several loops (servers)
        self.batches = 0
        self.items = 0

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        st = self._state.get(loop)
        if st is None:
            for old in [lp for lp in self._state if lp.is_closed()]:
                del self._state[old]
            st = self._state[loop] = [[], None]
        fut = loop.create_future()
        st[0].append((item, fut))
        if st[1] is None or st[1].done():
            st[1] = loop.create_task(self._run(st))
        return await fut

    async def _run(self, st):
        loop = asyncio.get_running_loop()
        queue = st[0]
        while queue:
            for _ in range(self.gather_rounds):
                if len(queue) >= self.max_batch:
                    break
                await asyncio.sleep(0)
            batch = queue[:self.max_batch]
            del queue[:self.max_batch]
            items = [it for it, _ in batch]
            try:
                results = await loop.run_in_executor(compute_executor(), self.fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
            except BaseException as e:  # every waiter gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                continue
            self.batches += 1
            self.items += len(items)
            for (_, fut), r in zip(batch, results):
                if not fut.done():
                    fut.set_result(r)


# ----------------------------------------------------------------------------- local

class LocalBackend(Backend):
    """A Hugging Face causal LM run in-process with batched ``generate``."""

    def __init__(self, model, tokenizer, name: str = "model", max_batch: int = 64, device: Optional[str] = None):
        if tokenizer is None:
            raise ValueError("LocalBackend needs the model's tokenizer")
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ValueError(
                f"tokenizer mismatch for {name!r}: the tokenizer has {len(tokenizer)} tokens but the model's "
                f"embedding has {vocab}; load the tokenizer saved with this model")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {name!r} has no eos token")
        self.model = model.eval()
        if device is not None:
            self.model = self.model.to(device)
        self.tokenizer = tokenizer
        self.name = name
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._batcher = MicroBatcher(self._run_batch, max_batch=max_batch)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str, name: Optional[str] = None, **kw):
        """``path``: a checkpoint directory or ``testbed:<name>`` (a shipped testbed model)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if path.startswith("testbed:"):
            from scrimp import testbed
            model, tok = testbed.load(path.split(":", 1)[1])
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
        return cls(model, tok, name=name or path, **kw)

    def describe(self) -> dict:
        n = sum(p.numel() for p in self.model.parameters())
        return {"name": self.name, "backend": "local", "params": n,
                "architecture": type(self.model).__name__}

    async def generate(self, prompt: str, max_tokens: int, params: GenParams) -> GenResult:
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        return await self._batcher.submit((prompt, int(max_tokens), params))

    def generate_batch(self, prompts: Sequence[str], max_tokens: int, params: GenParams) -> List[GenResult]:
        """Synchronous batched generation (also used by the server)."""
        return self._run_batch([(p, max_tokens, params) for p in prompts])

    def _run_batch(self, items) -> List[GenResult]:
        # items with identical sampling parameters and budgets share one generate call
        groups = {}
        for i, (prompt, mt, params) in enumerate(items):
            key = (mt, params.temperature, params.top_p, params.top_k)
            groups.setdefault(key, []).append(i)
        out: List[Optional[GenResult]] = [None] * len(items)
        for (mt, temp, top_p, top_k), idx in groups.items():
            res = self._generate([items[i][0] for i in idx], mt, temp, top_p, top_k)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _generate(self, prompts, max_tokens, temperature, top_p, top_k) -> List[GenResult]:
        import torch
        tok = self.tokenizer
        ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        n = max(len(x) for x in ids)
        if limit is not None and n + max_tokens > limit:
            max_tokens = max(1, limit - n)
        inp = torch.full((len(ids), max(1, n)), self._pad, dtype=torch.long)
        att = torch.zeros_like(inp)
        for b, x in enumerate(ids):  # left padding
            if x:
                inp[b, n - len(x):] = torch.tensor(x)
                att[b, n - len(x):] = 1
        dev = next(self.model.parameters()).device
        kw = dict(max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id, pad_token_id=self._pad,
                  use_cache=True)
        if temperature and temperature > 0:
            kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p),
                      top_k=int(top_k) if top_k else 0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._lock, torch.no_grad():
            gen = self.model.generate(inp.to(dev), attention_mask=att.to(dev), **kw)
        new = gen[:, inp.shape[1]:].cpu().tolist()
        out = []
        for row in new:
            finish = "length"
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
                finish = "stop"
            out.append(GenResult(text=tok.decode(row, skip_special_tokens=True), finish_reason=finish,
                                 n_tokens=len(row), endpoint="local"))
        return out


# ----------------------------------------------------------------------------- remote

@dataclass
class _Endpoint:
    url: str
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    down_until: float = 0.0


class RemoteBackend(Backend):
    """OpenAI-compatible completions endpoints for one model.

    ``urls``: base URLs (``http://host:port`` or ``.../v1``; ``/v1/completions`` is
    appended when missing). Each request goes to the endpoint with the fewest
    requests in flight (endpoints that failed recently are avoided for
    ``cooldown`` seconds). At most ``concurrency`` requests are in flight in total.
    Connection errors, timeouts, HTTP 408/429/5xx and malformed replies are retried
    up to ``retries`` times with exponential backoff (``backoff * 2**attempt``,
    jittered); other HTTP errors fail at once. A failure raises
    :class:`BackendError`."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, urls: Sequence[str], model_name: str, tokenizer=None, concurrency: int = 64,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, cooldown: float = 5.0,
                 name: Optional[str] = None, api_key: Optional[str] = None):
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("RemoteBackend needs at least one endpoint URL")
        self.endpoints = [_Endpoint(self._completions_url(u)) for u in urls]
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.name = name or model_name
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.cooldown = float(cooldown)
        self.api_key = api_key
        self._client = None
        self._sem = None
        self._loop = None
        self._rr = 0

    @staticmethod
    def _completions_url(u: str) -> str:
        u = u.rstrip("/")
        if u.endswith("/completions"):
            return u
        if not u.endswith("/v1"):
            u += "/v1"
        return u + "/completions"

    def describe(self) -> dict:
        return {"name": self.name, "backend": "remote", "model": self.model_name,
                "endpoints": [{"url": e.url, "served": e.served, "failures": e.failures} for e in self.endpoints]}

    def _ensure(self):
        import httpx
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None:
            self._loop = loop
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits, headers=headers)
            self._sem = asyncio.Semaphore(self.concurrency)

    def _pick(self, exclude=None) -> _Endpoint:
        now = time.monotonic()
        cands = [e for e in self.endpoints if e.down_until <= now and e is not exclude]
        if not cands:
            cands = [e for e in self.endpoints if e is not exclude] or self.endpoints
        low = min(e.in_flight for e in cands)
        best = [e for e in cands if e.in_flight == low]
        self._rr += 1
        return best[self._rr % len(best)]

    async def aclose(self):
        if self._client is not None:
            try:
                await self._client.aclose()
            except RuntimeError:
                pass
            self._client = None

    async def generate(self, prompt: str, max_tokens: int, params: GenParams) -> GenResult:
        import httpx
        self._ensure()
        payload = {"model": self.model_name, "prompt": prompt, "max_tokens": int(max_tokens),
                   "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                   "n": 1, "stream": False}
        last_err = "no attempt"
        prev = None
        async with self._sem:
            for attempt in range(self.retries + 1):
                ep = self._pick(exclude=prev)
                ep.in_flight += 1
                retry = True
                try:
                    r = await self._client.post(ep.url, json=payload)
                    if r.status_code != 200:
                        body = r.text[:300]
                        last_err = f"HTTP {r.status_code} from {ep.url}: {body}"
                        retry = r.status_code in self.RETRY_STATUS
                        raise BackendError(last_err)
                    try:
                        data = r.json()
                        choice = data["choices"][0]
                        text = choice["text"]
                        if not isinstance(text, str):
                            raise TypeError("choices[0].text is not a string")
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        last_err = f"malformed reply from {ep.url}: {type(e).__name__}: {e}; body {r.text[:200]!r}"
                        raise BackendError(last_err)
                    usage = data.get("usage") or {}
                    ep.served += 1
                    return GenResult(text=text, finish_reason=choice.get("finish_reason") or "length",
                                     n_tokens=usage.get("completion_tokens"), endpoint=ep.url)
                except (httpx.TransportError, BackendError) as e:
                    if isinstance(e, httpx.TransportError):
                        last_err = f"{type(e).__name__} talking to {ep.url}: {e}"
                    ep.failures += 1
                    ep.down_until = time.monotonic() + self.cooldown
                    prev = ep
                    if not retry or attempt == self.retries:
                        break
                    await asyncio.sleep(self.backoff * (2 ** attempt) * (0.5 + random.random()))
                finally:
                    ep.in_flight -= 1
        raise BackendError(f"{self.name}: request failed after {attempt + 1} attempt(s): {last_err}")
