"""The KV packet store: ``scrimp.PacketStore`` (tiers GPU / host / disk, LRU, pins, checksums).

Packets are immutable: the K and V of every layer of one wrapped document plus what is needed to
move them (RoPE frequencies and the positions they were computed at). The key of a packet is the
SHA-256 of (model fingerprint, adapter id, token ids), so the same document for the same model and
adapters is stored once.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import _C

__all__ = ["PacketStore", "Packet", "packet_key"]

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}


def packet_key(token_ids, model_fingerprint: str, adapter_id: str = "", pruning: str = "") -> str:
    """The key (64 hex digits) a packet of ``token_ids`` for this model and adapter is stored under
    (``pruning``: the rule a pruned packet was pruned by; "" for a full packet)."""
    if not isinstance(pruning, str):
        raise TypeError(f"pruning must be a str, got {type(pruning).__name__}")
    return _C.packet_key(str(model_fingerprint), str(adapter_id), _ids_list(token_ids), pruning)


def _ids_list(token_ids) -> List[int]:
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype.is_floating_point:
            raise TypeError(f"token_ids must be integers, got {token_ids.dtype}")
        return [int(t) for t in token_ids.reshape(-1).tolist()]
    if isinstance(token_ids, (str, bytes)):
        raise TypeError("token_ids must be a sequence of ints (token ids), not text")
    out = []
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"token_ids must be ints, got {type(t).__name__}")
        out.append(t)
    return out


def _layers_of(kv) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(K, V) per layer from a transformers Cache or a sequence of pairs."""
    layers = getattr(kv, "layers", None)
    if layers is not None and not isinstance(kv, (list, tuple)):
        return [(l.keys, l.values) for l in layers]
    if hasattr(kv, "key_cache"):  # older transformers DynamicCache
        return list(zip(kv.key_cache, kv.value_cache))
    pairs = list(kv)
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise TypeError(f"kv[{i}]: expected a (keys, values) pair per layer")
    return [(p[0], p[1]) for p in pairs]


class Packet:
    """A KV packet handed out by :meth:`PacketStore.get`; pinned in the store until released.

    ``keys(l)`` / ``values(l)`` are ``[1, kv_heads, tokens, head_dim]`` tensors that view the
    store's memory directly (zero-copy; treat them as read-only). Use as a context manager or call
    :meth:`release` to let the store evict it again.
    """

    def __init__(self, handle):
        self._h = handle
        self.key: str = handle.key
        self.meta: Dict[str, Any] = handle.meta
        self.tier: str = handle.tier
        self.device = torch.device(handle.device)
        self._payload = torch.from_dlpack(handle.payload_dlpack())

    # --- metadata ---
    @property
    def num_layers(self) -> int:
        return self.meta["num_layers"]

    @property
    def num_tokens(self) -> int:
        return self.meta["num_tokens"]

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.meta["dtype"]]

    @property
    def position_start(self) -> int:
        return self.meta["position_start"]

    @property
    def token_ids(self) -> List[int]:
        """The whole wrapped document's token ids (also for a pruned packet)."""
        return self.meta["token_ids"]

    @property
    def pruned(self) -> bool:
        return bool(self.meta["kept"])

    @property
    def kept(self) -> List[int]:
        """Indices into :attr:`token_ids` of the tokens the payload holds (all of them if not pruned)."""
        return self.meta["kept"] or list(range(self.num_tokens))

    @property
    def positions(self) -> List[int]:
        """The position each payload token's key was rotated for."""
        return [self.position_start + i for i in self.kept]

    @property
    def extra(self) -> Any:
        e = self.meta["extra"]
        try:
            return json.loads(e) if e else None
        except ValueError:
            return e

    @property
    def payload(self) -> torch.Tensor:
        """``[layers, 2, kv_heads, tokens, head_dim]`` view of the packet memory."""
        self._check()
        return self._payload

    def keys(self, layer: int) -> torch.Tensor:
        return self.payload[layer, 0].unsqueeze(0)

    def values(self, layer: int) -> torch.Tensor:
        return self.payload[layer, 1].unsqueeze(0)

    def _check(self):
        if self._payload is None:
            raise ValueError(f"packet {self.key[:12]} was released")

    def release(self) -> None:
        """Unpin (the tensors already handed out keep the memory alive until they are freed)."""
        self._payload = None
        self._h.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        m = self.meta
        return (f"Packet({self.key[:12]}, tokens={m['num_tokens']}, layers={m['num_layers']}, "
                f"kv_heads={m['num_kv_heads']}, head_dim={m['head_dim']}, {m['dtype']}, tier={self.tier})")


def _check_bytes(name, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int number of bytes, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


class PacketStore:
    """An embeddable store of immutable KV packets in GPU, host and disk tiers.

    Parameters
    ----------
    path : str, optional
        Directory of the disk tier (created if missing; reopened directories are re-indexed, bad
        files reported in :meth:`messages` and dropped). None: no disk tier.
    gpu_bytes : int
        Capacity of the GPU tier (needs a usable CUDA device; 0 disables it).
    host_bytes : int
        Capacity of the host tier (pinned memory when CUDA is usable). Default 1 GiB.
    disk_bytes : int, optional
        Capacity of the disk tier; default 16 GiB when ``path`` is given.
    fsync : bool
        fsync every file (and the directory) when written (crash safety; slower).

    Every blocking call releases the GIL; the store is safe to use from many threads.
    """

    def __init__(self, path: Optional[str] = None, gpu_bytes: int = 0, host_bytes: int = 1 << 30,
                 disk_bytes: Optional[int] = None, cuda_device: int = 0, fsync: bool = True,
                 verify_on_open: bool = False):
        _check_bytes("gpu_bytes", gpu_bytes)
        _check_bytes("host_bytes", host_bytes)
        if disk_bytes is None:
            disk_bytes = (16 << 30) if path is not None else 0
        _check_bytes("disk_bytes", disk_bytes)
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or None, got {type(path).__name__}")
        self.path = os.fspath(path) if path is not None else None
        self._s = _C.PacketStore(self.path or "", gpu_bytes, host_bytes, disk_bytes if path else 0,
                                 cuda_device, fsync, verify_on_open)

    def put(self, kv, token_ids, *, model_fingerprint: str, adapter_id: str = "", position_start: int = 0,
            inv_freq: Optional[torch.Tensor] = None, rope_layout: str = "half", extra: Any = None,
            kept: Optional[Sequence[int]] = None, pruning: str = "") -> str:
        """Store the KV of one wrapped document; returns its key.

        ``kv``: a transformers Cache or a sequence of ``(keys, values)`` per layer, each
        ``[1, kv_heads, tokens, head_dim]`` (float32/float16/bfloat16, CPU or CUDA).
        ``inv_freq``: the model's RoPE frequencies (``[rotary_dim / 2]``), needed to move the packet.
        A pruned packet gives ``kept`` (strictly increasing indices into ``token_ids``, one per KV
        token) and ``pruning`` (the rule that chose them; part of the key).
        """
        layers = _layers_of(kv)
        if not layers:
            raise ValueError("kv has no layers")
        ids = _ids_list(token_ids)
        ks, vs = [], []
        for i, (k, v) in enumerate(layers):
            for name, t in (("keys", k), ("values", v)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"layer {i} {name}: expected a torch.Tensor, got {type(t).__name__}")
                if t.dtype not in _DTYPES:
                    raise TypeError(f"layer {i} {name}: packets hold float32/float16/bfloat16, got {t.dtype}")
            ks.append(k.detach())
            vs.append(v.detach())
        n = ks[0].shape[-2]
        if not isinstance(pruning, str):
            raise TypeError(f"pruning must be a str, got {type(pruning).__name__}")
        kept_l = [] if kept is None else _ids_list(kept)
        if kept is None and pruning:
            raise ValueError(f"pruning rule {pruning!r} given without kept indices")
        if kept is not None:
            if not pruning:
                raise ValueError("a pruned packet (kept given) needs a non-empty pruning rule")
            if len(kept_l) != n:
                raise ValueError(f"kept has {len(kept_l)} indices but the KV holds {n} tokens")
        elif len(ids) != n:
            raise ValueError(f"token_ids has {len(ids)} ids but the KV holds {n} tokens")
        if inv_freq is None:
            freqs: List[float] = []
        else:
            freqs = [float(f) for f in torch.as_tensor(inv_freq).reshape(-1).tolist()]
        if rope_layout not in ("half", "interleaved"):
            raise ValueError(f"rope_layout must be 'half' or 'interleaved', got {rope_layout!r}")
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty str (see scrimp.packets.model_fingerprint)")
        extra_s = "" if extra is None else (extra if isinstance(extra, str) else json.dumps(extra))
        return self._s.put(model_fingerprint, str(adapter_id), ids, int(position_start), rope_layout, freqs,
                           extra_s, ks, vs, kept_l, pruning)

    def get(self, key: str, device="cpu", *, model_fingerprint: Optional[str] = None,
            adapter_id: Optional[str] = None, dtype: Optional[torch.dtype] = None,
            num_layers: Optional[int] = None, num_kv_heads: Optional[int] = None,
            head_dim: Optional[int] = None) -> Optional[Packet]:
        """The packet under ``key`` on ``device`` ("cpu" or "cuda"), or None on a miss.

        The expectations given (fingerprint, adapter, dtype, head layout) are checked: a packet that
        does not match raises ValueError / TypeError instead of being used by the wrong model.
        """
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if dtype is not None and dtype not in _DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        h = self._s.get(self._key(key), "gpu" if dev.type == "cuda" else "host", model_fingerprint, adapter_id,
                        None if dtype is None else _DTYPES[dtype], num_layers, num_kv_heads, head_dim)
        return None if h is None else Packet(h)

    @staticmethod
    def _key(key) -> str:
        if not isinstance(key, str):
            raise TypeError(f"a packet key is a str of 64 hex digits, got {type(key).__name__}")
        return key

    def contains(self, key: str) -> bool:
        return self._s.contains(self._key(key))

    __contains__ = contains

    def meta(self, key: str) -> Optional[Dict[str, Any]]:
        return self._s.meta(self._key(key))

    def evict(self, key: str) -> bool:
        """Remove a packet from every tier; False when absent or handed out (in use)."""
        return self._s.evict(self._key(key))

    def shrink(self, tier: str, target_bytes: int = 0) -> None:
        """Move unpinned packets out of ``tier`` ("gpu", "host", "disk") down to ``target_bytes``."""
        if tier not in ("gpu", "host", "disk"):
            raise ValueError(f"tier must be gpu, host or disk, got {tier!r}")
        self._s.shrink(tier, target_bytes)

    def keys(self) -> List[str]:
        return self._s.keys()

    def __len__(self) -> int:
        return self.stats()["packets"]

    def stats(self) -> Dict[str, int]:
        """Counters: hits/misses (per tier), puts, evictions per tier, promotions, bytes and packets per
        tier, pinned, corrupt_files, io_errors, bytes_written/read."""
        return dict(self._s.stats())

    def messages(self, clear: bool = False) -> List[str]:
        """Problems seen (corrupt files dropped, failed writes...), oldest first."""
        return list(self._s.take_messages() if clear else self._s.messages())

    @property
    def gpu_enabled(self) -> bool:
        return self._s.gpu_enabled

    def __repr__(self):
        s = self.stats()
        return (f"PacketStore(path={self.path!r}, packets={s['packets']}, gpu={s['bytes_gpu']}B, "
                f"host={s['bytes_host']}B, disk={s['bytes_disk']}B)")
