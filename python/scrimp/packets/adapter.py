"""KV Packet's adapters: the trained header and trailer soft tokens that wrap every document, saved as
safetensors with the fingerprint of the model they were trained for."""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch
import torch.nn as nn

from .model_io import _wrong_model_message, model_dtype_name, model_fingerprint, model_fingerprint_any_dtype

#: the ``format`` metadata of an adapter file (safetensors: tensors ``header`` and ``trailer``)
ADAPTER_FORMAT = "scrimp-kv-packet-adapters-v1"


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
