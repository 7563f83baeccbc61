"""scrimp.PacketStore: round trips, zero-copy, tiers, pins, mismatches, disk faults, threads."""
import os
import resource
import signal
import threading

import pytest
import torch

import scrimp
from scrimp.packets import packet_key

FP = "model-fp-1"


def make_kv(layers=2, heads=2, tokens=6, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, heads, tokens, dim, generator=g).to(dtype),
             torch.randn(1, heads, tokens, dim, generator=g).to(dtype)) for _ in range(layers)]


def put(store, seed, tokens=6, **kw):
    kv = make_kv(tokens=tokens, seed=seed, **kw)
    ids = [seed * 1000 + i for i in range(tokens)]
    return store.put(kv, ids, model_fingerprint=FP, adapter_id="a1", inv_freq=torch.ones(4)), kv


def nbytes(tokens=6, layers=2, heads=2, dim=8, esize=4):
    return layers * 2 * heads * tokens * dim * esize


def test_sha256_vectors_and_crc32c():
    assert scrimp._C.sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert scrimp._C.sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert scrimp._C.crc32c(b"123456789") == 0xE3069283


def test_round_trip_zero_copy_and_miss():
    s = scrimp.PacketStore(host_bytes=1 << 20)
    key, kv = put(s, 1)
    assert key == packet_key([1000 + i for i in range(6)], FP, "a1")
    assert s.contains(key) and key in s and len(s) == 1
    p = s.get(key)
    assert p.tier == "host" and p.num_tokens == 6 and p.num_layers == 2
    for l, (k, v) in enumerate(kv):
        assert torch.equal(p.keys(l), k) and torch.equal(p.values(l), v)
    q = s.get(key)
    assert q.payload.data_ptr() == p.payload.data_ptr()  # both view the store's host memory
    assert s.stats()["pinned"] == 1
    missing = packet_key([1, 2, 3], FP, "a1")
    assert s.get(missing) is None
    st = s.stats()
    assert st["hits"] == 2 and st["misses"] == 1 and st["bytes_host"] == nbytes()
    assert not s.evict(key)  # in use
    p.release()
    q.release()
    with pytest.raises(ValueError):
        p.keys(0)
    assert s.stats()["pinned"] == 0
    assert s.evict(key) and not s.contains(key)


def test_tensors_outlive_the_packet_object():
    s = scrimp.PacketStore(host_bytes=nbytes())
    key, kv = put(s, 1)
    k0 = s.get(key).keys(0)  # the Packet object is gone, the view keeps the pin
    import gc
    gc.collect()
    assert s.stats()["pinned"] == 1
    with pytest.raises(ValueError, match="no tier has room"):
        put(s, 2)  # the only slot is in use
    assert torch.equal(k0, kv[0][0])
    del k0
    gc.collect()
    assert s.stats()["pinned"] == 0
    put(s, 2)
    assert s.stats()["evictions_host"] == 1


def test_mismatches_are_clear_errors():
    s = scrimp.PacketStore()
    key, _ = put(s, 1)
    with pytest.raises(ValueError, match="belongs to model"):
        s.get(key, model_fingerprint="other-model")
    with pytest.raises(TypeError, match="dtype"):
        s.get(key, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head layout"):
        s.get(key, num_kv_heads=4)
    with pytest.raises(ValueError, match="adapter"):
        s.get(key, adapter_id="a2")
    assert s.get(key, model_fingerprint=FP, dtype=torch.float32, num_kv_heads=2, head_dim=8) is not None
    kv = make_kv()
    kv[1] = (kv[1][0].half(), kv[1][1].half())
    with pytest.raises(TypeError, match="does not match the packet dtype"):
        s.put(kv, list(range(6)), model_fingerprint=FP)
    kv = make_kv()
    kv[1] = (torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8))
    with pytest.raises(ValueError, match="kv_heads, tokens, head_dim"):
        s.put(kv, list(range(6)), model_fingerprint=FP)
    with pytest.raises(ValueError, match="token_ids has"):
        s.put(make_kv(), list(range(5)), model_fingerprint=FP)
    with pytest.raises(TypeError):
        s.put(make_kv(dtype=torch.float64), list(range(6)), model_fingerprint=FP)
    with pytest.raises(TypeError):
        s.get(123)
    with pytest.raises(ValueError, match="64 hex"):
        s.get("abc")
    with pytest.raises(TypeError):
        scrimp.PacketStore(host_bytes=1.5)


def test_strided_and_bf16_put():
    s = scrimp.PacketStore()
    big = torch.randn(1, 2, 10, 8).bfloat16()
    kv = [(big[:, :, 2:8], big[:, :, 1:7])]
    key = s.put(kv, list(range(6)), model_fingerprint=FP)
    p = s.get(key)
    assert p.dtype == torch.bfloat16
    assert torch.equal(p.keys(0), big[:, :, 2:8]) and torch.equal(p.values(0), big[:, :, 1:7])


def test_dynamic_cache_in_and_extra_metadata():
    from transformers import DynamicCache
    kv = make_kv()
    cache = scrimp.packets.AssembledKV([k for k, _ in kv], [v for _, v in kv], []).to_cache()
    assert isinstance(cache, DynamicCache)
    s = scrimp.PacketStore()
    key = s.put(cache, list(range(6)), model_fingerprint=FP, extra={"doc": 3})
    p = s.get(key)
    assert p.extra == {"doc": 3} and torch.equal(p.keys(1), kv[1][0])


def test_disk_tier_lru_promotion_reopen_and_corruption(tmp_path):
    d = str(tmp_path / "pk")
    s = scrimp.PacketStore(d, host_bytes=2 * nbytes(), disk_bytes=1 << 20, fsync=False)
    keys = [put(s, i)[0] for i in range(4)]
    st = s.stats()
    assert st["packets_host"] == 2 and st["packets_disk"] == 2 and st["evictions_host"] == 2
    p = s.get(keys[0])  # from disk, promoted
    assert torch.equal(p.keys(0), make_kv(seed=0)[0][0])
    assert s.stats()["hits_disk"] == 1 and s.stats()["promotions"] == 1
    p.release()
    s.shrink("host", 0)  # everything to disk
    assert s.stats()["bytes_host"] == 0
    del s
    files = sorted(os.listdir(d))
    assert len(files) == 4
    # corrupt one payload byte, truncate another, add garbage
    with open(os.path.join(d, keys[1] + ".kvp"), "r+b") as f:
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 1]))
    with open(os.path.join(d, keys[2] + ".kvp"), "r+b") as f:
        f.truncate(100)
    with open(os.path.join(d, "f" * 64 + ".kvp"), "wb") as f:
        f.write(b"garbage" * 20)
    s = scrimp.PacketStore(d, host_bytes=1 << 20, disk_bytes=1 << 20)
    st = s.stats()
    assert st["corrupt_files"] == 2 and st["packets"] == 3  # truncated + garbage dropped on open
    assert s.get(keys[1]) is None  # payload corruption found on read: never served
    assert s.stats()["corrupt_files"] == 3
    msgs = " | ".join(s.messages())
    assert "payload checksum mismatch" in msgs and "truncated" in msgs and "bad magic" in msgs
    for i in (0, 3):
        p = s.get(keys[i])
        assert torch.equal(p.values(1), make_kv(seed=i)[1][1])


def test_disk_full_reported_store_keeps_serving(tmp_path):
    d = str(tmp_path / "pk")
    s = scrimp.PacketStore(d, host_bytes=0, disk_bytes=1 << 24)
    k1, kv1 = put(s, 1)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, old[1]))
    try:
        with pytest.raises(RuntimeError, match="disk write failed"):
            put(s, 2, tokens=64)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert s.stats()["io_errors"] == 1
    assert any("disk write failed" in m for m in s.messages())
    assert torch.equal(s.get(k1).keys(0), kv1[0][0])
    assert len(os.listdir(d)) == 1


def test_threads_put_get_evict():
    s = scrimp.PacketStore(host_bytes=8 * nbytes())
    errors = []

    def work(t):
        try:
            for i in range(60):
                seed = (t * 7 + i) % 12
                if i % 3 == 0:
                    put(s, seed)
                else:
                    p = s.get(packet_key([seed * 1000 + j for j in range(6)], FP, "a1"))
                    if p is not None:
                        assert torch.equal(p.keys(1), make_kv(seed=seed)[1][0])
                        p.release()
                if i % 11 == 0:
                    s.evict(packet_key([seed * 1000 + j for j in range(6)], FP, "a1"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    th = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert not errors, errors
    st = s.stats()
    assert st["pinned"] == 0 and st["bytes_host"] <= 8 * nbytes() and st["hits"] > 0


@pytest.mark.skipif(not (torch.cuda.is_available() and scrimp.build_info()["cuda_device_usable"]),
                    reason="needs a usable CUDA device")
def test_gpu_tier():
    s = scrimp.PacketStore(gpu_bytes=nbytes(), host_bytes=4 * nbytes())
    k1, kv1 = put(s, 1)
    k2, kv2 = put(s, 2)  # pushes 1 down to host
    st = s.stats()
    assert st["packets_gpu"] == 1 and st["packets_host"] == 1
    p = s.get(k1, device="cuda")
    assert p.device.type == "cuda" and torch.equal(p.keys(0).cpu(), kv1[0][0])
    h = s.get(k2, device="cpu")
    assert torch.equal(h.values(1), kv2[1][1])


def test_gpu_tier_without_cuda_is_an_error():
    if scrimp.build_info()["cuda_device_usable"]:
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(ValueError, match="CUDA"):
        scrimp.PacketStore(gpu_bytes=1 << 20)
