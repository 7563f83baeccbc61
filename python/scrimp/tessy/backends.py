"""Generation backends for TESSY: text in, text out.

* :class:`LocalBackend` - a Hugging Face causal LM in this process, on the device and in
  the dtype asked for. Concurrent ``generate`` calls (one per problem in flight) are
  gathered by a micro-batcher into one left-padded, batched ``model.generate`` call, run
  in a worker thread; with incremental decoding each problem keeps its own KV cache
  across its spans (a ``session``) and only the new tokens are prefilled.
* :class:`RemoteBackend` - one or more OpenAI-compatible ``/v1/completions``
  endpoints (vLLM, SGLang, :mod:`scrimp.tessy.server`): async HTTP with a
  concurrency limit, timeouts, retries with bounded exponential backoff, the least
  loaded endpoint chosen per request, and requests kept inside each endpoint's
  context length (``max_model_len`` from ``/v1/models``).

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
           "MicroBatcher", "compute_executor", "DECODING_MODES"]


class BackendError(RuntimeError):
    """A request that failed for good, with a readable reason.

    ``permanent``: the server refused the request itself (an HTTP 4xx client error, or a prompt that
    leaves no room in the model's context); the same request would be refused again, so it is not
    retried. ``reason``: a short tag for the failure record (``error``, ``refused``, ``context_length``)."""

    def __init__(self, message: str, permanent: bool = False, reason: Optional[str] = None):
        super().__init__(message)
        self.permanent = bool(permanent)
        self.reason = reason or ("refused" if permanent else "error")


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

    #: True when :meth:`generate` takes a ``session`` (a per-problem key) and keeps state for it
    incremental: bool = False

    async def generate(self, prompt: str, max_tokens: int, params: GenParams) -> GenResult:
        raise NotImplementedError

    def end_session(self, session) -> None:
        """Free whatever the backend keeps for ``session`` (backends with ``incremental``)."""

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

DECODING_MODES = ("incremental", "reprefill")


class _Session:
    """One problem's context in one model: ``ids`` are the token ids whose keys and values are
    cached, ``kv`` one ``(keys, values)`` pair per layer, each ``[1, kv_heads, len(ids), head_dim]``."""
    __slots__ = ("ids", "kv")

    def __init__(self, ids, kv):
        self.ids = ids
        self.kv = kv


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LocalBackend(Backend):
    """A Hugging Face causal LM run in-process with batched ``generate``.

    ``device`` / ``dtype``: where the model runs and in which dtype (``None`` keeps the model's).
    ``decoding``:

    * ``"incremental"`` (default): each problem (a ``session`` passed to :meth:`generate`) keeps its
      own KV cache across its spans. Every call tokenizes the whole prompt text as ``reprefill``
      does, reuses the cached keys/values of the longest common token prefix and prefills only the
      rest (the other model's text written since this model's last span, plus the few tokens whose
      tokenization changed at the span boundary). The token ids fed to the model are exactly those
      of ``reprefill``, so greedy traces are the same.
    * ``"reprefill"``: every call prefills the whole prompt text (cost quadratic in trace length).

    Calls without a session always re-prefill. Incremental decoding needs full attention in every
    layer: models with sliding-window or non-attention layers are refused by name (use
    ``"reprefill"`` for them)."""

    incremental = False

    def __init__(self, model, tokenizer, name: str = "model", max_batch: int = 64, device=None, dtype=None,
                 decoding: str = "incremental"):
        if tokenizer is None:
            raise ValueError("LocalBackend needs the model's tokenizer")
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            raise ValueError(
                f"tokenizer mismatch for {name!r}: the tokenizer has {len(tokenizer)} tokens but the model's "
                f"embedding has {vocab}; load the tokenizer saved with this model")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {name!r} has no eos token")
        if decoding not in DECODING_MODES:
            raise ValueError(f"decoding must be one of {DECODING_MODES}, got {decoding!r}")
        if decoding == "incremental":
            from scrimp import hf
            try:
                hf.refuse_features(model.config, "TESSY incremental decoding", model=model,
                                   refuse=("sliding_window", "hybrid_layers"))
            except ValueError as e:
                raise ValueError(f"{name!r}: {e}; use decoding='reprefill' (--decoding reprefill)") from None
        from scrimp.models import resolve_device, resolve_dtype
        self.model = model.eval()
        if device is not None:
            self.model = self.model.to(resolve_device(device))
        dt = resolve_dtype(dtype)
        if dt is not None:
            self.model = self.model.to(dt)
        self.tokenizer = tokenizer
        self.name = name
        self.decoding = decoding
        self.incremental = decoding == "incremental"
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = [tokenizer.eos_token_id]
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]):
            if isinstance(e, int) and e not in eos:
                eos.append(e)
        self._eos = eos
        self._keep_special = set()
        self._sessions = {}
        self._sessions_lock = threading.Lock()
        import inspect
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._batcher = MicroBatcher(self._run_batch, max_batch=max_batch)
        self._lock = threading.Lock()
        #: tokens run through the model in prefill, and prompt tokens whose keys/values came from a session cache
        self.prefill_tokens = 0
        self.reused_tokens = 0

    @classmethod
    def from_pretrained(cls, spec: str, name: Optional[str] = None, device=None, dtype=None, **kw):
        """Load with :func:`scrimp.load_model`: ``spec`` is ``testbed:NAME``, a checkpoint directory or a
        hub id; ``device`` (default ``auto``: CUDA when available) and ``dtype`` (default: the
        checkpoint's)."""
        from scrimp.models import load_model
        model, tok = load_model(spec, device=device, dtype=dtype)
        return cls(model, tok, name=name or spec, **kw)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def describe(self) -> dict:
        n = sum(p.numel() for p in self.model.parameters())
        return {"name": self.name, "backend": "local", "params": n, "architecture": type(self.model).__name__,
                "device": str(self.device), "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "decoding": self.decoding}

    def keep_special(self, texts: Sequence[str]) -> None:
        """Keep these texts (think markers) in decoded output even when the tokenizer marks them as
        special tokens (other special tokens are dropped from the decoded text)."""
        self._keep_special.update(t for t in texts if t)

    async def generate(self, prompt: str, max_tokens: int, params: GenParams, session=None) -> GenResult:
        """Continue ``prompt``; ``session`` (any hashable, one per problem) keeps this model's KV cache
        between calls in incremental decoding (free it with :meth:`end_session`)."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        return await self._batcher.submit((prompt, int(max_tokens), params, session))

    def end_session(self, session) -> None:
        """Free the KV cache kept for ``session``."""
        with self._sessions_lock:
            self._sessions.pop(session, None)

    @property
    def sessions(self) -> int:
        """Sessions whose KV caches are held."""
        return len(self._sessions)

    def generate_batch(self, prompts: Sequence[str], max_tokens: int, params: GenParams) -> List[GenResult]:
        """Synchronous batched generation without sessions (also used by the server)."""
        return self._run_batch([(p, max_tokens, params, None) for p in prompts])

    def _run_batch(self, items) -> List[GenResult]:
        # items with identical sampling parameters, budgets and decoding share one generate call
        groups = {}
        for i, item in enumerate(items):
            prompt, mt, params = item[:3]
            session = item[3] if len(item) > 3 else None
            inc = self.incremental and session is not None
            key = (mt, params.temperature, params.top_p, params.top_k, inc)
            groups.setdefault(key, []).append(i)
        out: List[Optional[GenResult]] = [None] * len(items)
        for (mt, temp, top_p, top_k, inc), idx in groups.items():
            prompts = [items[i][0] for i in idx]
            if inc:
                res = self._generate_incremental(prompts, [items[i][3] for i in idx], mt, temp, top_p, top_k)
            else:
                res = self._generate(prompts, mt, temp, top_p, top_k)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _sampling_kwargs(self, max_tokens, temperature, top_p, top_k) -> dict:
        kw = dict(max_new_tokens=max_tokens, eos_token_id=self._eos, pad_token_id=self._pad, use_cache=True)
        if temperature and temperature > 0:
            kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p),
                      top_k=int(top_k) if top_k else 0)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def _clamp(self, n: int, max_tokens: int) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and n + max_tokens > limit:
            return max(1, limit - n)
        return max_tokens

    def _left_padded(self, ids, width):
        import torch
        inp = torch.full((len(ids), max(1, width)), self._pad, dtype=torch.long)
        att = torch.zeros_like(inp)
        for b, x in enumerate(ids):
            if x:
                inp[b, width - len(x):] = torch.tensor(x)
                att[b, width - len(x):] = 1
        return inp, att

    def _results(self, rows) -> List[GenResult]:
        tok = self.tokenizer
        drop = set(getattr(tok, "all_special_ids", []) or [])
        if self._keep_special:
            drop -= {i for i in drop if tok.convert_ids_to_tokens(i) in self._keep_special}
        out = []
        for row in rows:
            finish = "length"
            for j, t in enumerate(row):
                if t in self._eos:
                    row, finish = row[:j], "stop"
                    break
            text = tok.decode([t for t in row if t not in drop], skip_special_tokens=False)
            out.append(GenResult(text=text, finish_reason=finish, n_tokens=len(row), endpoint="local"))
        return out

    def _generate(self, prompts, max_tokens, temperature, top_p, top_k) -> List[GenResult]:
        import torch
        ids = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        n = max(len(x) for x in ids)
        max_tokens = self._clamp(n, max_tokens)
        inp, att = self._left_padded(ids, n)
        dev = self.device
        with self._lock, torch.no_grad():
            gen = self.model.generate(inp.to(dev), attention_mask=att.to(dev),
                                      **self._sampling_kwargs(max_tokens, temperature, top_p, top_k))
        self.prefill_tokens += sum(len(x) for x in ids)
        return self._results(gen[:, inp.shape[1]:].cpu().tolist())

    def _generate_incremental(self, prompts, sessions, max_tokens, temperature, top_p, top_k) -> List[GenResult]:
        """Batched generation that reuses each session's cached keys/values.

        Rows are right-aligned at column ``T`` (the longest prompt). The last ``W`` columns (``W`` = the
        most uncached tokens of any row) are prefilled; columns before them come from the session
        caches, left-padded (masked) into one batched cache ``[B, kv_heads, T - W, head_dim]`` per
        layer. After ``generate`` each row's keys/values (prompt + generated tokens but the last) are
        cut out again into its session."""
        import torch
        from transformers import DynamicCache
        if len(set(sessions)) != len(sessions):
            raise RuntimeError("one session has two requests in flight")
        ids = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        if any(not x for x in ids):
            return self._generate(prompts, max_tokens, temperature, top_p, top_k)
        with self._sessions_lock:
            held = [self._sessions.get(s) for s in sessions]
        lens = [len(x) for x in ids]
        reuse = [0 if h is None else min(_common_prefix(h.ids, x), len(x) - 1) for h, x in zip(held, ids)]
        T = max(lens)
        W = max(n - r for n, r in zip(lens, reuse))
        C = T - W
        keep = [max(0, n - W) for n in lens]  # cached tokens each row takes from its session (<= reuse)
        max_tokens = self._clamp(T, max_tokens)
        dev = self.device
        inp, att = self._left_padded(ids, T)
        data = None
        if C > 0:
            ref = next(h for h, k in zip(held, keep) if k > 0)
            data = []
            for layer, (k0, v0) in enumerate(ref.kv):
                K = k0.new_zeros((len(ids), k0.shape[1], C, k0.shape[3]))
                V = v0.new_zeros((len(ids), v0.shape[1], C, v0.shape[3]))
                for b, (h, k) in enumerate(zip(held, keep)):
                    if k > 0:
                        K[b, :, C - k:] = h.kv[layer][0][0, :, :k]
                        V[b, :, C - k:] = h.kv[layer][1][0, :, :k]
                data.append((K, V))
        cache = DynamicCache(ddp_cache_data=data) if data is not None else DynamicCache()
        kw = self._sampling_kwargs(max_tokens, temperature, top_p, top_k)
        kw[self._cache_kw] = cache
        with self._lock, torch.no_grad():
            gen = self.model.generate(inp.to(dev), attention_mask=att.to(dev), **kw)
        new = gen[:, T:]
        steps = new.shape[1]
        layers = getattr(cache, "layers", None)
        if cache.get_seq_length() != T + steps - 1 or layers is None or not all(
                hasattr(l, "keys") for l in layers):
            raise RuntimeError(f"{type(self.model).__name__}: generate left a cache of {cache.get_seq_length()} "
                               f"tokens, expected {T + steps - 1}; use decoding='reprefill' for this model")
        rows = new.cpu().tolist()
        with self._sessions_lock:
            for b, s in enumerate(sessions):
                lo = T - lens[b]
                kv = [(l.keys[b:b + 1, :, lo:].clone(), l.values[b:b + 1, :, lo:].clone()) for l in layers]
                self._sessions[s] = _Session(ids[b] + rows[b][:steps - 1], kv)
        self.prefill_tokens += sum(n - k for n, k in zip(lens, keep))
        self.reused_tokens += sum(keep)
        return self._results(rows)


# ----------------------------------------------------------------------------- remote

@dataclass
class _Endpoint:
    url: str                                 # .../v1/completions
    base: str = ""                           # http://host:port (no /v1)
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    down_until: float = 0.0
    probed: bool = False                     # /v1/models read and the model found there
    max_model_len: Optional[int] = None      # the context length the endpoint reports for the model
    tokenize: Optional[bool] = None          # whether POST /tokenize answers (None: not tried)
    clamped: int = 0                         # requests whose max_tokens was lowered to fit the context


class RemoteBackend(Backend):
    """OpenAI-compatible completions endpoints for one model.

    ``urls``: base URLs (``http://host:port`` or ``.../v1``; ``/v1/completions`` is appended when
    missing). Each request goes to the endpoint with the fewest requests in flight (endpoints that
    failed recently are avoided for ``cooldown`` seconds). At most ``concurrency`` requests are in
    flight in total.

    Context length: before its first request an endpoint's ``GET /v1/models`` is read; the model
    must be listed there under ``model_name``, and the ``max_model_len`` it reports (vLLM does) bounds
    every request: ``max_tokens`` is lowered to ``max_model_len - prompt tokens``, the prompt counted
    with ``tokenizer`` (or the server's ``POST /tokenize`` without one). A prompt that leaves no room
    fails at once (:class:`BackendError` with ``permanent`` and reason ``context_length``).
    ``max_model_len`` overrides what the endpoints report.

    Errors: connection errors, timeouts, HTTP 408/409/425/429/5xx, malformed replies and replies that
    name another model are retried up to ``retries`` times with exponential backoff
    (``backoff * 2**attempt``, jittered, at most ``max_backoff`` seconds); any other HTTP 4xx is the
    server refusing the request and fails at once (``permanent``). Prompts are sent with
    ``add_special_tokens: false`` (the chat template already wrote them), as the local backend
    tokenizes them."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, urls: Sequence[str], model_name: str, tokenizer=None, concurrency: int = 64,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, cooldown: float = 5.0,
                 name: Optional[str] = None, api_key: Optional[str] = None, max_backoff: float = 10.0,
                 max_model_len: Optional[int] = None):
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("RemoteBackend needs at least one endpoint URL")
        self.endpoints = [_Endpoint(self._completions_url(u), base=self._base_url(u)) for u in urls]
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.name = name or model_name
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.cooldown = float(cooldown)
        self.api_key = api_key
        if max_model_len is not None and (isinstance(max_model_len, bool) or int(max_model_len) < 2):
            raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
        self.max_model_len = None if max_model_len is None else int(max_model_len)
        self._client = None
        self._sem = None
        self._loop = None
        self._rr = 0

    @staticmethod
    def _base_url(u: str) -> str:
        u = u.rstrip("/")
        for tail in ("/completions", "/v1"):
            if u.endswith(tail):
                u = u[:-len(tail)]
        return u

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
                "endpoints": [{"url": e.url, "served": e.served, "failures": e.failures,
                               "max_model_len": e.max_model_len, "clamped": e.clamped} for e in self.endpoints]}

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

    # ------------------------------------------------------------------ endpoint facts
    async def _probe(self, ep: _Endpoint) -> None:
        """Read ``GET /v1/models``: the model must be listed; keep its ``max_model_len``."""
        url = ep.base + "/v1/models"
        r = await self._client.get(url)
        if r.status_code in self.RETRY_STATUS:
            raise BackendError(f"HTTP {r.status_code} from {url}: {r.text[:200]}")
        if r.status_code != 200:  # a server without the listing: nothing known about the context
            ep.max_model_len, ep.probed = None, True
            return
        try:
            models = r.json()["data"]
            ids = [m["id"] for m in models]
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"malformed reply from {url}: {type(e).__name__}: {e}; body {r.text[:200]!r}")
        if self.model_name not in ids:
            raise BackendError(f"{ep.base} serves {ids}, not {self.model_name!r} (check the model name)")
        entry = models[ids.index(self.model_name)]
        mml = entry.get("max_model_len")
        ep.max_model_len = int(mml) if isinstance(mml, int) and not isinstance(mml, bool) and mml > 0 else None
        ep.probed = True

    async def _count_tokens(self, ep: _Endpoint, prompt: str) -> Optional[int]:
        """Prompt tokens by ``tokenizer``, else by the endpoint's ``POST /tokenize``; None when neither."""
        if self.tokenizer is not None:
            return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if ep.tokenize is False:
            return None
        r = await self._client.post(ep.base + "/tokenize", json={"model": self.model_name, "prompt": prompt,
                                                                 "add_special_tokens": False})
        if r.status_code == 200:
            try:
                n = r.json()["count"]
                ep.tokenize = True
                return int(n)
            except (ValueError, KeyError, TypeError):
                pass
        if r.status_code in self.RETRY_STATUS:
            raise BackendError(f"HTTP {r.status_code} from {ep.base}/tokenize: {r.text[:200]}")
        ep.tokenize = False
        return None

    def context_limit(self, ep: _Endpoint) -> Optional[int]:
        lims = [x for x in (self.max_model_len, ep.max_model_len) if x]
        return min(lims) if lims else None

    async def _budget(self, ep: _Endpoint, prompt: str, max_tokens: int) -> int:
        limit = self.context_limit(ep)
        if limit is None:
            return max_tokens
        n = await self._count_tokens(ep, prompt)
        if n is None:
            return min(max_tokens, max(1, limit - 1))
        room = limit - n
        if room < 1:
            raise BackendError(f"the prompt has {n} tokens and {ep.base} serves {self.model_name!r} with "
                               f"max_model_len {limit}: no room for a generated token", permanent=True,
                               reason="context_length")
        if room < max_tokens:
            ep.clamped += 1
            return room
        return max_tokens

    async def check(self) -> List[Optional[str]]:
        """Read every endpoint's ``/v1/models`` now (retried like a request). One entry per endpoint:
        None when it answers and serves ``model_name``, else the reason."""
        import httpx
        self._ensure()
        out = []
        for ep in self.endpoints:
            last = None
            for attempt in range(self.retries + 1):
                try:
                    await self._probe(ep)
                    last = None
                    break
                except (httpx.TransportError, BackendError) as e:
                    last = str(e) if isinstance(e, BackendError) else f"{type(e).__name__} talking to {ep.base}: {e}"
                    if attempt < self.retries:
                        await asyncio.sleep(self._delay(attempt))
            out.append(last)
        return out

    def _delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * (2 ** attempt)) * (0.5 + random.random())

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: str, max_tokens: int, params: GenParams) -> GenResult:
        import httpx
        self._ensure()
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        payload = {"model": self.model_name, "prompt": prompt, "max_tokens": int(max_tokens),
                   "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                   "n": 1, "stream": False, "add_special_tokens": False}
        last_err = "no attempt"
        prev = None
        attempt = 0
        async with self._sem:
            for attempt in range(self.retries + 1):
                ep = self._pick(exclude=prev)
                ep.in_flight += 1
                try:
                    if not ep.probed:
                        await self._probe(ep)
                    payload["max_tokens"] = await self._budget(ep, prompt, int(max_tokens))
                    r = await self._client.post(ep.url, json=payload)
                    if r.status_code != 200:
                        last_err = f"HTTP {r.status_code} from {ep.url}: {r.text[:300]}"
                        raise BackendError(last_err, permanent=r.status_code not in self.RETRY_STATUS)
                    try:
                        data = r.json()
                        choice = data["choices"][0]
                        text = choice["text"]
                        if not isinstance(text, str):
                            raise TypeError("choices[0].text is not a string")
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        last_err = f"malformed reply from {ep.url}: {type(e).__name__}: {e}; body {r.text[:200]!r}"
                        raise BackendError(last_err)
                    got = data.get("model")
                    if got is not None and got != self.model_name:
                        last_err = f"{ep.url} answered as model {got!r}, not {self.model_name!r}"
                        raise BackendError(last_err)
                    usage = data.get("usage") or {}
                    ep.served += 1
                    return GenResult(text=text, finish_reason=choice.get("finish_reason") or "length",
                                     n_tokens=usage.get("completion_tokens"), endpoint=ep.url)
                except (httpx.TransportError, BackendError) as e:
                    ep.probed = False  # read /v1/models again: the server may have been restarted
                    if isinstance(e, httpx.TransportError):
                        last_err = f"{type(e).__name__} talking to {ep.url}: {e}"
                    else:
                        last_err = str(e)
                        if e.permanent:
                            raise BackendError(f"{self.name}: request refused (not retried): {last_err}",
                                               permanent=True, reason=e.reason) from None
                    ep.failures += 1
                    ep.down_until = time.monotonic() + self.cooldown
                    prev = ep
                    if attempt == self.retries:
                        break
                    await asyncio.sleep(self._delay(attempt))
                finally:
                    ep.in_flight -= 1
        raise BackendError(f"{self.name}: request failed after {attempt + 1} attempt(s): {last_err}")
