"""Property tests (hypothesis) over the public Python API: random shapes, dtypes, strides, values with
NaN/inf, empty tensors and wrong types. Every call must return the documented result (checked against
the float64 references) or raise ValueError/TypeError - never anything else, never a crash.

Tolerances: |err| <= 2e-5 + 2e-5 |ref| for the scores of finite float32 logits (float16/bfloat16 logits
are compared to the reference on the same rounded values, so the same bound holds); kl_loss 1e-4 relative."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import scrimp  # noqa: E402
from reference import token_scores_reference  # noqa: E402

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALLOWED = (ValueError, TypeError)


@st.composite
def logits(draw, min_v=1, max_v=300, allow_special=True, dtype=None):
    """A [..., V] tensor: 0-3 leading dims (possibly empty), any dtype, optionally a strided view whose
    last dim stays contiguous, values of any magnitude with -inf / +inf / NaN sprinkled in."""
    lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    V = draw(st.integers(min_v, max_v))
    dt = dtype or draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, V, generator=g, dtype=torch.float64) * scale
    if allow_special and x.numel() and draw(st.booleans()):
        n = draw(st.integers(1, max(1, x.numel() // 3)))
        idx = torch.randint(0, x.numel(), (n,), generator=g)
        x.view(-1)[idx] = draw(st.sampled_from([-math.inf, math.inf, math.nan]))
    x = x.to(dt)
    if lead and draw(st.booleans()):  # non-contiguous leading strides: every other row of a bigger tensor
        big = torch.zeros(*lead[:-1], 2 * lead[-1], V, dtype=dt)
        big[..., ::2, :] = x
        x = big[..., ::2, :]
    return x


def _close(a, b, atol=2e-5, rtol=2e-5):
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    ok = both_nan | same_inf | ((a - b).abs() <= atol + rtol * b.abs())
    return bool(ok.all())


@SETTINGS
@given(s=logits(), with_teacher=st.booleans(), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_token_scores_match_the_reference_or_raise(s, with_teacher, temperature):
    t = None
    if with_teacher:
        t = (s.float() * 0.7 + 0.1).to(s.dtype)
    out = scrimp.token_scores(s, t, temperature=temperature)
    ref = token_scores_reference(s, t, temperature)
    assert out.student_entropy.shape == s.shape[:-1] and out.student_entropy.dtype == torch.float32
    finite_rows = torch.isfinite(s.double()).all(-1)
    if t is not None:
        finite_rows &= torch.isfinite(t.double()).all(-1)
    for name, r in ref.items():
        got = getattr(out, name)
        assert got.shape == s.shape[:-1]
        # rows of finite logits must match; rows with inf/NaN have documented special values (tested in
        # test_scoring.py) and here must only stay in their row
        assert _close(got[finite_rows], r[finite_rows].float()), name
    if t is None:
        assert out.kl_forward is None and out.kl_reverse is None


@SETTINGS
@given(bad=st.sampled_from(["int", "list", "scalar", "float64", "temp0", "tempnan", "shape", "targets"]))
def test_token_scores_bad_arguments_raise_clear_errors(bad):
    s = torch.randn(3, 7)
    kwargs, teacher = {}, None
    if bad == "int":
        s = torch.ones(3, 7, dtype=torch.int32)
    elif bad == "list":
        s = [[0.0, 1.0]]
    elif bad == "scalar":
        s = torch.tensor(1.0)
    elif bad == "float64":
        s = s.double()
    elif bad == "temp0":
        kwargs["temperature"] = 0.0
    elif bad == "tempnan":
        kwargs["temperature"] = float("nan")
    elif bad == "shape":
        teacher = torch.randn(3, 8)
    elif bad == "targets":
        kwargs["targets"] = torch.full((3,), 7)  # out of range
    with pytest.raises(ALLOWED):
        scrimp.token_scores(s, teacher, **kwargs)


@SETTINGS
@given(s=logits(max_v=200, allow_special=False, dtype=torch.float32),
       kind=st.sampled_from(["reverse", "forward", "jsd"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), beta=st.sampled_from([0.1, 0.5, 0.9]))
def test_kl_loss_value_and_gradient_match_float64(s, kind, reduction, beta):
    from scrimp.distill_loss import kl_loss_reference

    if s.numel() == 0 and reduction == "mean":
        return  # mean of nothing is NaN, like torch (tested in test_kl_loss.py)
    t = (s * 0.5 + torch.randn_like(s)).detach()
    s1 = s.detach().clone().requires_grad_()
    out = scrimp.kl_loss(s1, t, kind, beta=beta, reduction=reduction)
    s2 = s.detach().double().requires_grad_()
    ref = kl_loss_reference(s2, t.double(), kind, beta=beta, reduction=reduction)
    assert out.shape == ref.shape
    assert _close(out.detach(), ref.detach(), atol=1e-4, rtol=1e-4)
    if s.numel():
        out.sum().backward()
        ref.sum().backward()
        assert _close(s1.grad, s2.grad, atol=1e-5, rtol=1e-4)


@SETTINGS
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), seq=st.integers(0, 9),
       half_dim=st.integers(1, 8), rotary_pairs=st.integers(1, 8), delta=st.integers(-5000, 5000),
       layout=st.sampled_from(["half", "interleaved"]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_rerotate_composes_and_inverts(batch, heads, seq, half_dim, rotary_pairs, delta, layout, dtype):
    D = 2 * half_dim
    R = min(rotary_pairs, half_dim)
    inv = 1.0 / (10000 ** (torch.arange(R, dtype=torch.float32) / R))
    k = torch.randn(batch, heads, seq, D, dtype=dtype)
    moved = scrimp.rerotate_keys(k, delta, inv, layout=layout)
    assert moved.shape == k.shape and moved.dtype == k.dtype
    back = scrimp.rerotate_keys(moved, -delta, inv, layout=layout)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert torch.allclose(back, k, atol=tol * 10, rtol=tol)
    # a rotation keeps the norm of every rotated pair, hence of every key
    assert torch.allclose(moved.double().norm(dim=-1), k.double().norm(dim=-1), atol=tol * 10, rtol=tol)


@SETTINGS
@given(bad=st.sampled_from(["3d", "int", "delta_float", "layout", "freq_too_long", "out_shape"]))
def test_rerotate_bad_arguments(bad):
    k = torch.randn(1, 2, 3, 8)
    inv = torch.ones(4)
    args = dict(keys=k, delta=3, inv_freq=inv, layout="half")
    if bad == "3d":
        args["keys"] = torch.randn(2, 3, 8)
    elif bad == "int":
        args["keys"] = torch.ones(1, 2, 3, 8, dtype=torch.int64)
    elif bad == "delta_float":
        args["delta"] = torch.tensor([0.5, 1.0, 2.0])
    elif bad == "layout":
        args["layout"] = "diagonal"
    elif bad == "freq_too_long":
        args["inv_freq"] = torch.ones(5)
    elif bad == "out_shape":
        args["out"] = torch.empty(1, 2, 4, 8)
    with pytest.raises(ALLOWED):
        scrimp.rerotate_keys(**args)


@SETTINGS
@given(B=st.integers(1, 3), L=st.integers(1, 40), rule=st.sampled_from(["soft_or", "entropy", "q3", "divergence",
                                                                       "random", "all"]),
       ratio=st.floats(0.01, 1.0), density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_tip_select_keeps_only_response_tokens_and_the_documented_count(B, L, rule, ratio, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < density
    scores = {"entropy": torch.rand(B, L, generator=g), "kl_reverse": torch.rand(B, L, generator=g) * 3,
              "kl_forward": torch.rand(B, L, generator=g) * 3}
    if not mask.any():
        with pytest.raises(ValueError):
            scrimp.tip.select(scores, mask, rule=rule, ratio=ratio, generator=g)
        return
    kept, stats = scrimp.tip.select(scores, mask, rule=rule, ratio=ratio, generator=g)
    assert kept.shape == mask.shape and kept.dtype == torch.bool
    assert not (kept & ~mask).any()
    m = int(mask.sum())
    expect = m if rule == "all" else min(m, max(1, math.floor(ratio * m + 1e-9)))  # documented in select
    assert int(kept.sum()) == expect
    assert 0 < stats.kept_fraction <= 1


@SETTINGS
@given(ratio=st.sampled_from([0.0, -0.1, 1.5, float("nan")]), rule=st.sampled_from(["soft_or", "nope"]))
def test_tip_select_bad_ratio_or_rule(ratio, rule):
    mask = torch.ones(2, 5, dtype=torch.bool)
    scores = {"entropy": torch.rand(2, 5), "kl_reverse": torch.rand(2, 5)}
    with pytest.raises(ALLOWED):
        scrimp.tip.select(scores, mask, rule=rule, ratio=ratio)


@SETTINGS
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), tokens=st.integers(1, 7), dim=st.sampled_from([2, 4, 6]),
       dtype=st.sampled_from(DTYPES), strided=st.booleans(), special=st.booleans())
def test_packet_store_round_trips_any_layout_bit_exactly(layers, heads, tokens, dim, dtype, strided, special):
    g = torch.Generator().manual_seed(layers * 100 + heads * 10 + tokens)
    kv = []
    for _ in range(layers):
        k = torch.randn(1, heads, tokens, dim, generator=g).to(dtype)
        v = torch.randn(1, heads, tokens, dim, generator=g).to(dtype)
        if special:
            k.view(-1)[0], v.view(-1)[-1] = float("nan"), float("-inf")
        if strided:  # tokens strided inside a bigger buffer, head_dim contiguous
            kb = torch.zeros(1, heads, 2 * tokens, dim, dtype=dtype)
            kb[:, :, ::2] = k
            k = kb[:, :, ::2]
        kv.append((k, v))
    store = scrimp.PacketStore(host_bytes=1 << 20)
    key = store.put(kv, list(range(tokens)), model_fingerprint="fp", inv_freq=torch.ones(dim // 2))
    p = store.get(key, dtype=dtype, num_layers=layers, num_kv_heads=heads, head_dim=dim)
    for layer, (k, v) in enumerate(kv):
        assert torch.equal(p.keys(layer).view(torch.int16 if dtype != torch.float32 else torch.int32),
                           k.contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32))
        assert torch.equal(p.values(layer).view(torch.int16 if dtype != torch.float32 else torch.int32),
                           v.contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32))


@SETTINGS
@given(bad=st.sampled_from(["no_fp", "ids_len", "int_kv", "mixed_dtype", "empty_ids", "not_tensor", "freq_long",
                            "negative_pos"]))
def test_packet_store_bad_puts_raise_and_store_nothing(bad):
    store = scrimp.PacketStore(host_bytes=1 << 20)
    kv = [(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))]
    args = dict(kv=kv, token_ids=[1, 2, 3], model_fingerprint="fp", inv_freq=torch.ones(2))
    if bad == "no_fp":
        args["model_fingerprint"] = ""
    elif bad == "ids_len":
        args["token_ids"] = [1, 2]
    elif bad == "int_kv":
        args["kv"] = [(torch.ones(1, 2, 3, 4, dtype=torch.int32),) * 2]
    elif bad == "mixed_dtype":
        args["kv"] = [(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).half())]
    elif bad == "empty_ids":
        args["kv"] = [(torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 4))]
        args["token_ids"] = []
    elif bad == "not_tensor":
        args["kv"] = [([1.0], [2.0])]
    elif bad == "freq_long":
        args["inv_freq"] = torch.ones(3)
    elif bad == "negative_pos":
        args["position_start"] = -1
    with pytest.raises(ALLOWED):
        store.put(args.pop("kv"), args.pop("token_ids"), **args)
    assert store.stats()["packets"] == 0
