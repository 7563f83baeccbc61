"""scrimp.token_scores on CPU against a float64 torch reference.

Tolerance: inputs of every dtype are exact in float32, so the error is accumulation only (float32
lanes per 1024-logit chunk, double across chunks, float32 output): |got - ref| <= ATOL + RTOL*|ref|
with ATOL = RTOL = 2e-5 for float32, float16 and bfloat16 alike, V up to 151936.
"""
import math

import pytest
import torch

import scrimp
from reference import token_scores_reference

ATOL = RTOL = 2e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIMD_LEVELS = ["generic", "avx2", "avx512"]
FIELDS = ["student_entropy", "teacher_entropy", "kl_forward", "kl_reverse", "student_logprob", "teacher_logprob"]


def assert_matches(got: scrimp.TokenScores, ref: dict):
    for name in FIELDS:
        g = getattr(got, name)
        if name not in ref:
            assert g is None, name
            continue
        r = ref[name]
        assert g is not None, name
        assert g.dtype == torch.float32 and g.shape == r.shape, (name, g.dtype, g.shape, r.shape)
        g = g.double()
        # Same NaN and same infinities as the reference, finite values within tolerance.
        assert torch.equal(torch.isnan(g), torch.isnan(r)), (name, g, r)
        fin = torch.isfinite(r)
        assert torch.equal(g[~fin & ~torch.isnan(r)], r[~fin & ~torch.isnan(r)]), name
        err = (g[fin] - r[fin]).abs()
        bound = ATOL + RTOL * r[fin].abs()
        assert bool((err <= bound).all()), f"{name}: max err {err.max().item():.3g}"


def random_logits(shape, dtype, scale=3.0):
    return (torch.randn(shape) * scale).to(dtype)


@pytest.fixture(params=SIMD_LEVELS)
def simd(request, monkeypatch):
    monkeypatch.setenv("SCRIMP_CPU_SIMD", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", [(0, 7), (1, 1), (3, 1), (5, 7), (37, 1271), (4, 32000), (2, 151936), (9, 1024), (3, 1025)])
def test_matches_float64_reference(simd, dtype, n, v):
    s, t = random_logits((n, v), dtype), random_logits((n, v), dtype)
    g = torch.randint(0, v, (n,))
    assert_matches(scrimp.token_scores(s, t, targets=g), token_scores_reference(s, t, targets=g))
    assert_matches(scrimp.token_scores(s), token_scores_reference(s))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_and_extreme_rows(simd, dtype):
    v = 1271
    s, t = random_logits((8, v), dtype), random_logits((8, v), dtype)
    ninf = float("-inf")
    s[0, : v // 2] = ninf; t[0, : v // 2] = ninf  # vocabulary padding on both sides: contributes 0
    s[1, 10:20] = ninf  # student masks tokens the teacher likes: kl_forward = +inf
    t[2, 30:40] = ninf  # teacher masks: kl_reverse = +inf
    s[3] = ninf; t[3] = ninf  # fully masked row: NaN, exactly like the reference
    s[4] = (torch.rand(v) * 2e4 - 1e4).to(dtype)  # huge magnitudes
    t[4] = (torch.rand(v) * 2e4 - 1e4).to(dtype)
    s[5, :-1] = ninf  # one live entry: entropy 0
    s[6] = 0; t[6] = 0  # uniform: entropy log V, KL 0
    g = torch.randint(0, v, (8,))
    got = scrimp.token_scores(s, t, targets=g)
    assert_matches(got, token_scores_reference(s, t, targets=g))
    assert math.isinf(got.kl_forward[1]) and math.isinf(got.kl_reverse[2])
    assert got.student_entropy[5] == 0
    assert abs(got.student_entropy[6].item() - math.log(v)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_in_its_row(simd, dtype):
    s, t = random_logits((6, 300), dtype), random_logits((6, 300), dtype)
    s[2, 17] = float("nan")
    t[4, 299] = float("nan")
    got = scrimp.token_scores(s, t)
    ref = token_scores_reference(s, t)
    assert_matches(got, ref)
    assert torch.isnan(got.student_entropy[2]) and torch.isnan(got.kl_forward[2]) and torch.isnan(got.kl_reverse[4])
    clean = [0, 1, 3, 5]
    assert torch.isfinite(got.kl_forward[clean]).all() and torch.isfinite(got.teacher_entropy[[0, 1, 2, 3, 5]]).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.7])
def test_temperature(simd, temperature):
    s, t = random_logits((7, 999), torch.bfloat16), random_logits((7, 999), torch.bfloat16)
    g = torch.randint(0, 999, (7,))
    got = scrimp.token_scores(s, t, temperature=temperature, targets=g)
    assert_matches(got, token_scores_reference(s, t, temperature, targets=g))


def test_any_leading_shape_and_strides():
    base_s = random_logits((5, 4, 333), torch.float32)
    base_t = random_logits((5, 4, 333), torch.float32)
    s, t = base_s.transpose(0, 1), base_t.transpose(0, 1)  # [4, 5, 333], leading strides permuted
    assert not s.is_contiguous()
    g = torch.randint(0, 333, (5, 4)).t()
    got = scrimp.token_scores(s, t, targets=g)
    assert got.student_entropy.shape == (4, 5)
    assert_matches(got, token_scores_reference(s, t, targets=g))
    # A slice with a row stride larger than V.
    wide = random_logits((6, 500), torch.float16)[:, 100:400]
    assert_matches(scrimp.token_scores(wide), token_scores_reference(wide))
    # 1-D input: a single row, scalar outputs.
    one = random_logits((77,), torch.float32)
    got1 = scrimp.token_scores(one, targets=torch.tensor(3))
    assert got1.student_entropy.shape == () and got1.student_logprob.shape == ()
    assert_matches(got1, token_scores_reference(one, targets=torch.tensor(3)))


def test_requires_grad_inputs_are_scored_without_grad():
    s = random_logits((3, 50), torch.float32).requires_grad_()
    got = scrimp.token_scores(s)
    assert not got.student_entropy.requires_grad
    assert_matches(got, token_scores_reference(s.detach()))


def test_bad_inputs_raise_clear_errors():
    s = random_logits((4, 10), torch.float32)
    with pytest.raises(TypeError, match="student_logits"):
        scrimp.token_scores([[1.0, 2.0]])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        scrimp.token_scores(s.double())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        scrimp.token_scores(torch.zeros(4, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="0-d"):
        scrimp.token_scores(torch.tensor(1.0))
    with pytest.raises(ValueError, match="vocabulary"):
        scrimp.token_scores(torch.zeros(4, 0))
    with pytest.raises(ValueError, match="teacher_logits: expected the student's shape"):
        scrimp.token_scores(s, random_logits((4, 11), torch.float32))
    with pytest.raises(TypeError, match="teacher_logits: expected the student's dtype"):
        scrimp.token_scores(s, s.half())
    with pytest.raises(ValueError, match="contiguous"):
        scrimp.token_scores(random_logits((10, 4), torch.float32).t())
    with pytest.raises(ValueError, match="temperature"):
        scrimp.token_scores(s, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        scrimp.token_scores(s, temperature=float("nan"))
    with pytest.raises(TypeError, match="temperature"):
        scrimp.token_scores(s, temperature="1")
    with pytest.raises(TypeError, match="targets: expected int64"):
        scrimp.token_scores(s, targets=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="targets: expected the logits' leading shape"):
        scrimp.token_scores(s, targets=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 10\)"):
        scrimp.token_scores(s, targets=torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match=r"targets: expected values in \[0, 10\)"):
        scrimp.token_scores(s, targets=torch.tensor([0, -1, 1, 2]))
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError)):
            scrimp.token_scores(s.to("meta"))


def test_core_checks_outputs_directly():
    # The binding re-checks what the Python layer allocates: a wrong output is an error, not a write.
    from scrimp import _C

    s = random_logits((4, 10), torch.float32)
    with pytest.raises(ValueError, match="student_entropy: expected a contiguous output of 4"):
        _C.token_scores(s, None, None, 1.0, torch.empty(3), None, None, None, None, None)
    with pytest.raises(TypeError, match="student_entropy: expected a float32 output"):
        _C.token_scores(s, None, None, 1.0, torch.empty(4, dtype=torch.float64), None, None, None, None, None)
    with pytest.raises(ValueError, match="teacher outputs were requested without teacher_logits"):
        _C.token_scores(s, None, None, 1.0, torch.empty(4), torch.empty(4), None, None, None, None)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        _C.token_scores("not a tensor", None, None, 1.0, None, None, None, None, None, None)


def test_custom_op_schema_and_torch_compile():
    s, t = random_logits((6, 257), torch.float32), random_logits((6, 257), torch.float32)
    g = torch.randint(0, 257, (6,))
    torch.library.opcheck(torch.ops.scrimp.token_scores.default, (s, t, g, 1.3))
    torch.library.opcheck(torch.ops.scrimp.token_scores.default, (s, None, None, 1.0))

    def f(a, b):
        sc = scrimp.token_scores(a, b)
        return sc.student_entropy * 2 + sc.kl_reverse

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    ref = token_scores_reference(s, t)
    torch.testing.assert_close(compiled(s, t).double(), ref["student_entropy"] * 2 + ref["kl_reverse"], atol=1e-4, rtol=1e-4)


def test_build_info():
    info = scrimp.build_info()
    for key in ["version", "cuda_compiled", "cuda_architectures", "cuda_device_usable", "cpu_simd", "openmp_threads"]:
        assert key in info
    assert info["version"] == scrimp.__version__
    assert info["cpu_simd"] in SIMD_LEVELS
    assert info["openmp_threads"] >= 1
    if not info["cuda_compiled"]:
        assert not info["cuda_device_usable"]
