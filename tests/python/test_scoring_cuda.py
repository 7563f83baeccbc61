"""scrimp.token_scores on CUDA against the CPU kernel and a float64 torch reference.

Skipped unless torch sees a GPU and scrimp was built with a usable CUDA backend.

Tolerance (all dtypes, every output): |got - ref| <= ATOL + RTOL * |ref| with ATOL = RTOL = 1e-4,
against both the float64 reference and the CPU kernel. float16/bfloat16 inputs are exact in float32,
so dtype does not change the bound: the error is the kernel's arithmetic only. Per term, the CUDA
kernel uses ex2.approx.ftz (relative error ~2^-22) on base-2 scaled logits (x * log2(e)/T, one
rounding of the scale, exact FMA against the running max), and float32 sums of <= a few hundred
terms per thread, combined in a float tree and finished in double. That is ~1e-6 relative on Z, A, B;
entropies (<= log V ~ 12 nats) and KLs built from them land ~1e-5 or better, so 1e-4 leaves a
margin of ~10x. Infinities and NaNs must match exactly. Set SCRIMP_CUDA_ERRLOG=path to append the
measured max errors of every comparison to a file (bench/gpu_check.sh does), to tighten this later.
"""
import math
import os

import pytest
import torch

import scrimp
from reference import token_scores_reference


def _cuda_usable():
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    info = scrimp.build_info()
    if not info.get("cuda_compiled"):
        return False, "scrimp was built without CUDA"
    if not info.get("cuda_device_usable"):
        return False, f"scrimp sees no usable CUDA device: {info.get('cuda_status')}"
    return True, ""


_OK, _WHY = _cuda_usable()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)

ATOL = RTOL = 1e-4
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FIELDS = ["student_entropy", "teacher_entropy", "kl_forward", "kl_reverse", "student_logprob", "teacher_logprob"]
NS = [0, 1, 3, 37, 300]
VS = [1, 7, 1271, 32000, 151936]
MAX_ELEMS = 12_000_000  # per tensor, for the N x V grid (one larger bf16 case is added explicitly)
SHAPES = [(n, v) for n in NS for v in VS if n * v <= MAX_ELEMS] + [(300, 151936)]


def _log_errors(what, name, err, rel):
    path = os.environ.get("SCRIMP_CUDA_ERRLOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{what}\t{name}\tmax_abs={err:.3e}\tmax_rel={rel:.3e}\n")


def assert_close_scores(got: scrimp.TokenScores, ref, what: str):
    """got (CUDA) vs ref (a dict of float64 tensors, or a TokenScores from the CPU kernel)."""
    for name in FIELDS:
        g = getattr(got, name)
        r = ref.get(name) if isinstance(ref, dict) else getattr(ref, name)
        if r is None:
            assert g is None, (what, name)
            continue
        assert g is not None, (what, name)
        assert g.dtype == torch.float32 and g.device.type == "cuda", (what, name, g.dtype, g.device)
        assert tuple(g.shape) == tuple(r.shape), (what, name, g.shape, r.shape)
        g = g.detach().double().cpu()
        r = r.detach().double().cpu()
        nan_g, nan_r = torch.isnan(g), torch.isnan(r)
        assert torch.equal(nan_g, nan_r), f"{what} {name}: NaN pattern differs\n got {g}\n ref {r}"
        inf_r = torch.isinf(r)
        assert torch.equal(torch.isinf(g), inf_r), f"{what} {name}: infinities differ\n got {g}\n ref {r}"
        assert torch.equal(g[inf_r], r[inf_r]), f"{what} {name}: infinity signs differ"
        fin = torch.isfinite(r)
        if fin.any():
            err = (g[fin] - r[fin]).abs()
            bound = ATOL + RTOL * r[fin].abs()
            rel = (err / r[fin].abs().clamp_min(1e-30)).max().item()
            _log_errors(what, name, err.max().item(), rel)
            bad = err > bound
            assert not bool(bad.any()), (
                f"{what} {name}: max abs err {err.max().item():.3g} (bound {ATOL} + {RTOL}*|ref|), "
                f"{int(bad.sum())} of {err.numel()} over"
            )


def random_logits(shape, dtype, scale=3.0, device="cuda"):
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _poison_allocator(numel):
    # Leave NaN in the blocks the caching allocator hands out next, so an output element the kernel
    # never writes cannot pass by holding a stale correct value.
    x = torch.full((max(int(numel), 1) * 8 + 1024,), float("nan"), device="cuda")
    del x


def cuda_scores(s, t=None, temperature=1.0, targets=None):
    _poison_allocator(s.numel() // max(s.shape[-1], 1))
    out = scrimp.token_scores(s, t, temperature=temperature, targets=targets)
    torch.cuda.synchronize()
    return out


def cpu_scores(s, t=None, temperature=1.0, targets=None):
    return scrimp.token_scores(
        s.cpu(), None if t is None else t.cpu(), temperature=temperature,
        targets=None if targets is None else targets.cpu(),
    )


def check_all(s, t=None, temperature=1.0, targets=None, against_cpu=True):
    got = cuda_scores(s, t, temperature, targets)
    assert_close_scores(got, token_scores_reference(s, t, temperature, targets), "vs float64")
    if against_cpu:
        assert_close_scores(got, cpu_scores(s, t, temperature, targets), "vs cpu")
    return got


# ---- shapes and dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", SHAPES)
def test_matches_reference_and_cpu(dtype, n, v):
    if (n, v) == (300, 151936) and dtype != torch.bfloat16:
        pytest.skip("the largest shape runs in bfloat16 only")
    s, t = random_logits((n, v), dtype), random_logits((n, v), dtype)
    g = torch.randint(0, v, (n,), device="cuda")
    check_all(s, t, targets=g)
    check_all(s)  # student only, no targets
    check_all(s, targets=g)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_many_rows_one_block_per_row(dtype):
    # Enough rows that no row is split (the path the N=4096 benchmark takes), and many short rows
    # (one warp per row).
    for n, v in [(1500, 32000), (5000, 1271)]:
        s, t = random_logits((n, v), dtype), random_logits((n, v), dtype)
        g = torch.randint(0, v, (n,), device="cuda")
        check_all(s, t, targets=g)


def test_deterministic():
    s, t = random_logits((5, 151936), torch.bfloat16), random_logits((5, 151936), torch.bfloat16)
    a = cuda_scores(s, t)
    b = cuda_scores(s, t)
    for name in ["student_entropy", "teacher_entropy", "kl_forward", "kl_reverse"]:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---- masked, extreme and NaN rows -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1271, 32000, 151936])
def test_masked_and_extreme_rows(dtype, v):
    n = 9
    s, t = random_logits((n, v), dtype), random_logits((n, v), dtype)
    ninf = float("-inf")
    s[0, : v // 2] = ninf; t[0, : v // 2] = ninf  # padding on both sides: contributes 0
    s[1, 10:20] = ninf  # student masks tokens the teacher likes: kl_forward = +inf
    t[2, 30:40] = ninf  # teacher masks: kl_reverse = +inf
    s[3] = ninf; t[3] = ninf  # fully masked row: NaN, as in the reference
    s[4] = ((torch.rand(v, device="cuda") * 2 - 1) * 1e4).to(dtype)  # huge magnitudes
    t[4] = ((torch.rand(v, device="cuda") * 2 - 1) * 1e4).to(dtype)
    s[5, :-1] = ninf  # one live entry: entropy 0
    s[6] = 0; t[6] = 0  # uniform: entropy log V, KL 0
    mask = torch.rand(v, device="cuda") < 0.3  # scattered masks, same on both sides
    s[7, mask] = ninf; t[7, mask] = ninf
    t[8, torch.rand(v, device="cuda") < 0.3] = ninf  # scattered on one side only
    g = torch.randint(0, v, (n,), device="cuda")
    got = check_all(s, t, targets=g)
    assert math.isinf(got.kl_forward[1].item()) and math.isinf(got.kl_reverse[2].item())
    assert math.isinf(got.kl_reverse[8].item()) and math.isfinite(got.kl_forward[8].item())
    assert abs(got.student_entropy[5].item()) < 1e-5
    assert abs(got.student_entropy[6].item() - math.log(v)) < 1e-4
    assert abs(got.kl_forward[6].item()) < 1e-5 and abs(got.kl_reverse[6].item()) < 1e-5
    # Same with the teacher only and with targets on masked entries (log-prob -inf).
    check_all(s)
    g2 = torch.full((n,), 15, device="cuda")  # s[1, 15] is masked: student log-prob -inf
    got2 = check_all(s, t, targets=g2)
    assert got2.student_logprob[1].item() == ninf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [300, 151936])
def test_nan_stays_in_its_row(dtype, v):
    s, t = random_logits((6, v), dtype), random_logits((6, v), dtype)
    s[2, 17] = float("nan")
    t[4, v - 1] = float("nan")
    got = check_all(s, t)
    assert torch.isnan(got.student_entropy[2]) and torch.isnan(got.kl_forward[2]) and torch.isnan(got.kl_reverse[4])
    clean = [0, 1, 3, 5]
    assert torch.isfinite(got.kl_forward[clean]).all() and torch.isfinite(got.student_entropy[clean]).all()
    assert torch.isfinite(got.teacher_entropy[[0, 1, 2, 3, 5]]).all()


@pytest.mark.parametrize("temperature", [0.5, 0.7, 1.0, 2.7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_temperature(dtype, temperature):
    for n, v in [(7, 999), (3, 151936), (40, 32000)]:
        s, t = random_logits((n, v), dtype), random_logits((n, v), dtype)
        g = torch.randint(0, v, (n,), device="cuda")
        check_all(s, t, temperature=temperature, targets=g)


def test_out_of_range_targets_give_nan():
    s, t = random_logits((4, 1271), torch.float32), random_logits((4, 1271), torch.float32)
    g = torch.tensor([0, -1, 1271, 5], device="cuda")
    got = cuda_scores(s, t, targets=g)
    lp_s, lp_t = got.student_logprob.cpu(), got.teacher_logprob.cpu()
    assert torch.isnan(lp_s[1]) and torch.isnan(lp_s[2]) and torch.isnan(lp_t[1]) and torch.isnan(lp_t[2])
    ok = torch.tensor([0, 3])
    ref = token_scores_reference(s[ok], t[ok], targets=g[ok])
    assert torch.allclose(lp_s[ok].double(), ref["student_logprob"].cpu(), atol=ATOL, rtol=RTOL)
    assert torch.allclose(lp_t[ok].double(), ref["teacher_logprob"].cpu(), atol=ATOL, rtol=RTOL)
    assert torch.isfinite(got.student_entropy).all()


# ---- strides and alignment ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_strides_and_alignment(dtype):
    # Transposed [T, B, V] view of [B, T, V] (leading strides permuted), targets transposed too.
    for v in [1271, 32000]:
        base_s, base_t = random_logits((5, 4, v), dtype), random_logits((5, 4, v), dtype)
        s, t = base_s.transpose(0, 1), base_t.transpose(0, 1)
        assert not s.is_contiguous()
        g = torch.randint(0, v, (5, 4), device="cuda").t()
        got = check_all(s, t, targets=g)
        assert got.student_entropy.shape == (4, 5)
    # Row stride larger than V and rows starting off a 16-byte boundary (head/tail elements).
    wide_s = random_logits((6, 40000), dtype)[:, 3:32003]
    wide_t = random_logits((6, 40000), dtype)[:, 3:32003]
    check_all(wide_s, wide_t, targets=torch.randint(0, 32000, (6,), device="cuda"))
    # Student and teacher rows with different 16-byte alignment (element-wise path).
    s = random_logits((5, 1271), dtype)
    t = random_logits((5, 1300), dtype)[:, 1:1272]
    check_all(s, t, targets=torch.randint(0, 1271, (5,), device="cuda"))
    s = random_logits((3, 151936), dtype)
    t = random_logits((3, 151940), dtype)[:, 1:151937]
    check_all(s, t)
    # Odd V: every row has a different alignment.
    for v in [7, 1271, 32001]:
        s, t = random_logits((11, v), dtype), random_logits((11, v), dtype)
        check_all(s, t, targets=torch.randint(0, v, (11,), device="cuda"))
    # 4-D view whose leading dims do not merge, and a stride-0 (expanded) leading dim.
    base = random_logits((4, 3, 6, 333), dtype)
    s4, t4 = base[::2, :, ::3], random_logits((2, 3, 2, 333), dtype)
    check_all(s4, t4, targets=torch.randint(0, 333, (2, 3, 2), device="cuda"))
    row = random_logits((1, 1271), dtype)
    check_all(row.expand(7, 1271), random_logits((7, 1271), dtype))
    # 1-D input: one row, scalar outputs.
    one = random_logits((77,), dtype)
    got1 = check_all(one, targets=torch.tensor(3, device="cuda"))
    assert got1.student_entropy.shape == () and got1.student_logprob.shape == ()


# ---- streams, devices, graphs ---------------------------------------------------------------------


def test_runs_on_the_current_stream():
    s, t = random_logits((37, 32000), torch.bfloat16), random_logits((37, 32000), torch.bfloat16)
    ref = token_scores_reference(s, t)
    x, y = torch.zeros_like(s), torch.zeros_like(t)
    side = torch.cuda.Stream()  # non-blocking: no implicit sync with the legacy default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)  # the copies below land late; a kernel on another stream would read zeros
        x.copy_(s)
        y.copy_(t)
        got = scrimp.token_scores(x, y)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert_close_scores(got, ref, "side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    s, t = random_logits((5, 32000), torch.float32, device="cuda:1"), random_logits((5, 32000), torch.float32, device="cuda:1")
    with torch.cuda.device(0):
        got = scrimp.token_scores(s, t)
    torch.cuda.synchronize(1)
    assert got.student_entropy.device == s.device
    assert_close_scores(got, token_scores_reference(s, t), "cuda:1")


@pytest.mark.parametrize("n,v", [(3, 151936), (2000, 1271)])  # split rows (scratch + finalize), plain
def test_cuda_graph_capture(n, v):
    s, t = random_logits((n, v), torch.bfloat16), random_logits((n, v), torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        scrimp.token_scores(s, t)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = scrimp.token_scores(s, t)
    s.copy_(random_logits((n, v), torch.bfloat16))
    t.copy_(random_logits((n, v), torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_scores(got, token_scores_reference(s, t), "graph replay")
