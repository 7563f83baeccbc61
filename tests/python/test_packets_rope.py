"""RoPE re-rotation against float64 torch and the model's own rotary embedding; fused assembly."""
import pytest
import torch

import scrimp
from scrimp.packets import assemble, rerotate_keys

CUDA = torch.cuda.is_available() and scrimp.build_info()["cuda_device_usable"]


def inv_freq(rot_dim, base=10000.0):
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))


def rotate_ref(x, pos, f, layout):
    """float64 reference: rotate raw x [B, H, S, D] to positions pos [S]."""
    x = x.double()
    f = f.double()
    ang = pos.double()[:, None] * f[None, :]  # [S, R/2]
    c, s = ang.cos(), ang.sin()
    y = x.clone()
    r = f.numel()
    if layout == "half":
        a, b = x[..., :r], x[..., r:2 * r]
        y[..., :r] = a * c - b * s
        y[..., r:2 * r] = b * c + a * s
    else:
        a, b = x[..., 0:2 * r:2], x[..., 1:2 * r:2]
        y[..., 0:2 * r:2] = a * c - b * s
        y[..., 1:2 * r:2] = b * c + a * s
    return y


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("rot_dim", [16, 12])  # 12: partial rotary, last 4 dims untouched
def test_matches_float64_reference(layout, rot_dim):
    torch.manual_seed(0)
    B, H, S, D = 2, 3, 9, 16
    f = inv_freq(rot_dim)
    raw = torch.randn(B, H, S, D, dtype=torch.float64)
    pos = torch.arange(S)
    k = rotate_ref(raw, pos, f, layout).float()
    for delta in (0, 5, 700, -3):
        got = rerotate_keys(k, delta, f, layout=layout)
        want = rotate_ref(raw, pos + delta, f, layout)
        assert (got.double() - want).abs().max() < 3e-6, delta
    per = torch.tensor([3, 100, 7, 0, 2000, 11, 5, 5, 9])
    got = rerotate_keys(k, per, f, layout=layout)
    assert (got.double() - rotate_ref(raw, pos + per, f, layout)).abs().max() < 3e-6
    # in place, and float64 keys
    k2 = k.clone()
    assert rerotate_keys(k2, per, f, layout=layout, out=k2) is k2
    assert torch.equal(k2, got)
    k64 = rotate_ref(raw, pos, f, layout)
    got64 = rerotate_keys(k64, 123, f, layout=layout)
    assert (got64 - rotate_ref(raw, pos + 123, f, layout)).abs().max() < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype, tol):
    torch.manual_seed(1)
    f = inv_freq(16)
    raw = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    k = rotate_ref(raw, torch.arange(8), f, "half").to(dtype)
    got = rerotate_keys(k, 33, f)
    want = rotate_ref(k.double(), torch.full((8,), 33), f, "half")
    assert got.dtype == dtype
    assert (got.double() - want).abs().max() < tol * 4


def test_non_contiguous_input():
    f = inv_freq(8)
    big = torch.randn(2, 3, 7, 8)
    k = big[:, :, 1:5]
    assert not k.is_contiguous()
    got = rerotate_keys(k, 9, f)
    assert torch.allclose(got, rerotate_keys(k.contiguous(), 9, f))


def test_bad_arguments():
    f = inv_freq(8)
    with pytest.raises(ValueError, match="batch, kv_heads"):
        rerotate_keys(torch.randn(2, 8), 1, f)
    with pytest.raises(TypeError):
        rerotate_keys(torch.zeros(1, 1, 2, 8, dtype=torch.int32), 1, f)
    with pytest.raises(ValueError, match="head_dim/2"):
        rerotate_keys(torch.randn(1, 1, 2, 8), 1, inv_freq(16))
    with pytest.raises(ValueError, match="shape"):
        rerotate_keys(torch.randn(1, 1, 3, 8), torch.tensor([1, 2]), f)
    with pytest.raises(TypeError):
        rerotate_keys(torch.randn(1, 1, 3, 8), 1.5, f)
    with pytest.raises(ValueError, match="layout"):
        rerotate_keys(torch.randn(1, 1, 3, 8), 1, f, layout="neox")
    with pytest.raises(TypeError):
        rerotate_keys(torch.randn(1, 1, 3, 8), 1, f, out=torch.empty(1, 1, 3, 8, dtype=torch.float16))


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "linear", "factor": 4.0}])
def test_matches_the_models_rotary_embedding(rope):
    """Keys computed at 0..n and re-rotated by d equal keys computed at d..d+n by the model's RoPE."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    cfg = LlamaConfig(**kw)
    if rope is not None:
        params = dict(rope)
        params["rope_theta"] = 10000.0
        if hasattr(cfg, "rope_parameters"):
            cfg.rope_parameters = params
        else:
            cfg.rope_scaling = params
    emb = LlamaRotaryEmbedding(cfg)
    torch.manual_seed(2)
    n, D = 24, 16
    raw = torch.randn(1, 2, n, D)
    q = torch.zeros_like(raw)

    def at(start):
        pos = torch.arange(start, start + n)[None]
        cos, sin = emb(raw, pos)
        return apply_rotary_pos_emb(q, raw, cos, sin)[1]

    f = emb.inv_freq
    for d in (1, 37, 500):
        got = rerotate_keys(at(0), d, f)
        want = at(d)
        # the model itself computes angles in float32: allow its rounding at position ~d
        assert (got - want).abs().max() < 2e-5 * max(1, d / 16), d


def _fake_packets(n_layers=2, H=2, D=8, lens=(3, 5), dtype=torch.float32):
    s = scrimp.PacketStore()
    pk, kvs = [], []
    for i, T in enumerate(lens):
        kv = [(torch.randn(1, H, T, D).to(dtype), torch.randn(1, H, T, D).to(dtype)) for _ in range(n_layers)]
        key = s.put(kv, [i * 100 + t for t in range(T)], model_fingerprint="m", inv_freq=inv_freq(D),
                    position_start=i)
        pk.append(s.get(key))
        kvs.append(kv)
    return s, pk, kvs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_assemble_equals_rerotate_and_cat(dtype):
    torch.manual_seed(3)
    s, pk, kvs = _fake_packets(dtype=dtype)
    prefix = [(torch.randn(1, 2, 1, 8).to(dtype), torch.randn(1, 2, 1, 8).to(dtype)) for _ in range(2)]
    out = assemble(pk, prefix=prefix)
    assert out.spans == [(1, 4), (4, 9)]
    for l in range(2):
        want_k = torch.cat([prefix[l][0]] + [rerotate_keys(kvs[i][l][0], out.spans[i][0] - i, inv_freq(8))
                                             for i in range(2)], dim=2)
        want_v = torch.cat([prefix[l][1]] + [kvs[i][l][1] for i in range(2)], dim=2)
        assert torch.equal(out.keys[l], want_k) and torch.equal(out.values[l], want_v)
    cache = out.to_cache()
    assert cache.get_seq_length() == 9
    # explicit positions (a gap of 10 before the second packet)
    out2 = assemble(pk, starts=[1, 14], prefix=prefix)
    assert torch.equal(out2.keys[0][:, :, 4:9], rerotate_keys(kvs[1][0][0], 13, inv_freq(8)))


def test_assemble_rejects_mixed_packets():
    s, pk, _ = _fake_packets()
    kv = [(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)) for _ in range(2)]
    other = s.get(s.put(kv, [1, 2, 3], model_fingerprint="m", inv_freq=inv_freq(8)))
    with pytest.raises(ValueError, match="num_kv_heads"):
        assemble([pk[0], other])
    kv = [(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)) for _ in range(2)]
    other = s.get(s.put(kv, [1, 2, 3], model_fingerprint="other", inv_freq=inv_freq(8)))
    with pytest.raises(ValueError, match="model_fingerprint"):
        assemble([pk[0], other])
    kv = [(torch.randn(1, 2, 3, 8).half(), torch.randn(1, 2, 3, 8).half()) for _ in range(2)]
    other = s.get(s.put(kv, [4, 5, 6], model_fingerprint="m", inv_freq=inv_freq(8)))
    with pytest.raises(TypeError, match="dtype"):
        assemble([pk[0], other])
    with pytest.raises(ValueError, match="no packets"):
        assemble([])


@pytest.mark.skipif(not CUDA, reason="needs a usable CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_cuda_matches_cpu(dtype, layout):
    torch.manual_seed(4)
    f = inv_freq(12)
    k = torch.randn(2, 3, 33, 16).to(dtype)
    per = torch.randint(-50, 3000, (33,))
    for delta in (17, per):
        cpu = rerotate_keys(k, delta, f, layout=layout)
        gpu = rerotate_keys(k.cuda(), delta.cuda() if isinstance(delta, torch.Tensor) else delta, f, layout=layout)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (gpu.cpu().float() - cpu.float()).abs().max() <= tol
    s, pk, _ = _fake_packets(dtype=dtype)
    gp = [s.get(p.key, device="cuda") for p in pk]
    a, b = assemble(pk), assemble(gp)
    for l in range(2):
        assert (a.keys[l].float() - b.keys[l].cpu().float()).abs().max() <= 2e-2
        assert torch.equal(a.values[l], b.values[l].cpu())


def test_simd_and_generic_paths_are_bit_identical(tmp_path):
    """The AVX2 rows must give exactly what the portable loop gives (SCRIMP_CPU_SIMD=generic)."""
    import os
    import subprocess
    import sys

    torch.manual_seed(5)
    f = inv_freq(56)  # 28 pairs: 16 (AVX-512) + 8 (AVX2) + 4 scalar
    k = torch.randn(1, 2, 9, 60)
    per = torch.randint(-100, 5000, (9,))
    torch.save({"k": k, "per": per, "f": f}, tmp_path / "in.pt")
    code = (
        "import torch, scrimp\n"
        f"d = torch.load({str(tmp_path / 'in.pt')!r})\n"
        "out = {str(dt): scrimp.rerotate_keys(d['k'].to(dt), d['per'], d['f']) for dt in (torch.float32, torch.bfloat16)}\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        "print(scrimp.build_info()['cpu_simd'])\n"
    )
    env = dict(os.environ, SCRIMP_CPU_SIMD="generic")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("generic")
    generic = torch.load(tmp_path / "out.pt")
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(rerotate_keys(k.to(dt), per, f), generic[str(dt)]), dt
