"""The IceCache configuration: one documented, validated object (``IceCacheOptions``) and the named
configurations (the defaults, :data:`PAPER`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

METHODS = ("icecache", "quest", "random", "oracle", "streaming", "full")

#: candidates per selected page that the default ``rerank`` re-scores (method "icecache")
DEFAULT_RERANK = 8

#: how much attention a summary row takes (``IceCacheOptions.summary_mass``)
SUMMARY_MASSES = ("exact", "mean")

#: summary rows per layer and KV head by default (see ``IceCacheOptions.summary_rows``)
DEFAULT_SUMMARY_ROWS = 64

#: the IceCache paper's configuration (arXiv 2604.10539): 16-token pages, sink 2 + window 2 pages, the
#: first 2 layers dense, pages chosen by their bounds alone, unselected pages left out of the softmax.
#: ``IceCache(model, budget=256, **PAPER)``. The defaults differ in page geometry, summaries and rerank
#: (chosen on testbed recall prompts of tuning seeds, measured on reporting seeds: docs/icecache.md).
PAPER = dict(page_size=16, sink_pages=2, window_pages=2, dense_layers=2, summaries=False, rerank=0)


def _int(name, v, low):
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")


def _opt_int(name, v):
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")


def _opt_bool(name, v):
    if v is not None and not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool or None, got {type(v).__name__}")


@dataclass(frozen=True)
class IceCacheOptions:
    """Every IceCache option; ``IceCache(model, options)`` or ``IceCache(model, **fields)`` (keywords
    override ``options``'s fields). ``resolved()`` checks the fields (ValueError / TypeError naming the
    field) and fills the method-dependent defaults (None below).

    Attributes
    ----------
    budget : tokens attended per decode step per layer and KV head (sink + window + selected pages).
        A budget above what the cache holds attends every token; memory follows the tokens held.
    page_size, sink_pages, window_pages : page geometry (8 tokens, 1 sink page, 1 window page);
        ``budget >= (sink_pages + window_pages) * page_size``. The paper's: 16, 2, 2 (:data:`PAPER`).
    dense_layers : the first layers keep a full (dynamic) cache (2, as in the paper).
    method : ``"icecache"`` (clustered pages, bound scores), baselines ``"quest"`` (time-ordered pages,
        bound scores), ``"random"``, ``"oracle"`` (exact max q.k per page), ``"streaming"`` (sink +
        window only) and ``"full"`` (every layer dense).
    device : where resident tokens and the page store live (None: the keys' device).
    cache_pages : most device page-cache slots per KV head (LRU; None: 2x the selected pages).
    max_context : None: the host pool grows with the sequence; an int: it never holds more tokens per
        layer and KV head (more raises ``ValueError("page pool full ...")``).
    measure : record the attention mass captured per step (keeps a full key copy; for evaluation).
    seed : clustering seed.
    pin_memory : pinned host pool when CUDA is usable.
    coarse_tokens : above this many new middle tokens, a coarse spherical k-means on the device into
        ceil(n / coarse_tokens) groups before the page tree (0: tree only).
    recluster_pages : every this many pages evicted from the window are re-clustered together.
    select_on_device : score page bounds on the device (None: on for CUDA, for icecache / quest, while a
        layer holds at most ``summary_rows`` pages; past that the host selects, so the device keeps no
        bounds mirror that grows with the context; True keeps the mirror at any length).
    reuse_selection : each selecting sparse layer's pages are reused by the next this many layers.
    prefetch : with reuse_selection, copy followers' pages ahead on the copy stream (None: on for CUDA).
    summaries : scrimp's extension (None: on for "icecache", off for the baselines): every page not
        selected still takes part in the softmax through a summary row of its group of pages (its mean
        value, weighted by the group's attention mass: see ``summary_mass``).
    summary_mass : how much attention a summary row takes (None: ``"exact"`` when summaries are on):
        ``"exact"``, its pages' true mass per query head, ``log sum_t exp(scale q.k_t)``, computed each
        step on the host from every indexed key (a full-context q.K on the CPU; the device holds no
        summary keys); ``"mean"``, its mean key scored with a log(token count) bias (a lower bound of
        that mass, no host work).
    summary_rows : most summary rows per layer and KV head (64). While a layer holds no more pages,
        one row per page; beyond, each row stands for ceil(pages / summary_rows) neighbouring pages,
        so the device memory of the summaries stays fixed as the context grows.
    rerank : scrimp's extension (None: :data:`DEFAULT_RERANK` for "icecache", 0 for the baselines): the
        bounds pick ``rerank`` x the selected pages as candidates, ranked by the exact max_t q.k_t.
    prefill_chunk : prefill this many tokens at a time (exact); None: one pass.
    """

    budget: int = 256
    page_size: int = 8
    sink_pages: int = 1
    window_pages: int = 1
    dense_layers: int = 2
    method: str = "icecache"
    device: object = None
    cache_pages: Optional[int] = None
    max_context: Optional[int] = None
    measure: bool = False
    seed: int = 0
    pin_memory: bool = True
    coarse_tokens: int = 1024
    recluster_pages: int = 4
    select_on_device: Optional[bool] = None
    reuse_selection: int = 0
    prefetch: Optional[bool] = None
    summaries: Optional[bool] = None
    summary_rows: int = DEFAULT_SUMMARY_ROWS
    summary_mass: Optional[str] = None
    rerank: Optional[int] = None
    prefill_chunk: Optional[int] = None

    @classmethod
    def of(cls, options: Optional["IceCacheOptions"] = None, **overrides) -> "IceCacheOptions":
        """``options`` (default: the defaults) with ``overrides``; TypeError naming an unknown field."""
        if options is not None and not isinstance(options, IceCacheOptions):
            raise TypeError(f"options must be an IceCacheOptions or None, got {type(options).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown IceCache option(s) {unknown}; the options are {sorted(names)}")
        return dataclasses.replace(options or cls(), **overrides)

    def resolved(self) -> "IceCacheOptions":
        """These options checked, with None method defaults filled in (summaries, rerank)."""
        for name in ("budget", "page_size", "sink_pages", "window_pages", "dense_layers"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be an int, got {type(getattr(self, name)).__name__}")
        for name in ("max_context", "prefill_chunk", "cache_pages"):
            _opt_int(name, getattr(self, name))
        if self.page_size <= 0:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.sink_pages < 0 or self.window_pages < 1:
            raise ValueError(f"need sink_pages >= 0 and window_pages >= 1, got {self.sink_pages} and "
                             f"{self.window_pages}")
        if self.budget < (self.sink_pages + self.window_pages) * self.page_size:
            raise ValueError(f"budget ({self.budget}) is smaller than sink + window = ({self.sink_pages} + "
                             f"{self.window_pages}) pages x {self.page_size} tokens = "
                             f"{(self.sink_pages + self.window_pages) * self.page_size}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
        for name in ("coarse_tokens", "recluster_pages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if not isinstance(self.reuse_selection, int) or isinstance(self.reuse_selection, bool) or \
                self.reuse_selection < 0:
            raise ValueError(f"reuse_selection must be an int >= 0, got {self.reuse_selection!r}")
        _opt_bool("prefetch", self.prefetch)
        _opt_bool("summaries", self.summaries)
        _opt_bool("select_on_device", self.select_on_device)
        for name in ("measure", "pin_memory"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if not isinstance(self.summary_rows, int) or isinstance(self.summary_rows, bool) or self.summary_rows < 1:
            raise ValueError(f"summary_rows must be an int >= 1, got {self.summary_rows!r}")
        rerank = self.rerank
        if rerank is None:
            rerank = DEFAULT_RERANK if self.method == "icecache" else 0
        if not isinstance(rerank, int) or isinstance(rerank, bool) or rerank < 0:
            raise ValueError(f"rerank must be an int >= 0 (candidate pages per selected page; 0 = off), got {rerank!r}")
        if rerank and self.method not in ("icecache", "quest"):
            raise ValueError(f"rerank re-scores bound candidates: it needs method 'icecache' or 'quest', not "
                             f"{self.method!r}")
        summaries = self.summaries if self.summaries is not None else self.method == "icecache"
        mass = self.summary_mass
        if mass is not None and mass not in SUMMARY_MASSES:
            raise ValueError(f"summary_mass must be one of {SUMMARY_MASSES} or None, got {mass!r}")
        if mass is not None and not summaries:
            raise ValueError(f"summary_mass={mass!r} needs summaries=True (it says how much attention a summary "
                             f"row takes)")
        if mass is None and summaries:
            mass = "exact"
        return dataclasses.replace(self, rerank=rerank, summaries=summaries, summary_mass=mass)
