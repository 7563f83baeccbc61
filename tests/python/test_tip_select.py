import math

import pytest
import torch

import scrimp
from scrimp.tip import TipScores, select, compute_scores


def _scores(h, d, f=None):
    h = torch.tensor(h, dtype=torch.float32)
    d = torch.tensor(d, dtype=torch.float32)
    f = None if f is None else torch.tensor(f, dtype=torch.float32)
    return TipScores(h, d, f)


def test_soft_or_hand_computed():
    # 1 x 6, all response; q98 of h over 6 values (linear interp) clips only the largest
    h = [0.0, 0.1, 0.2, 0.3, 0.4, 1.0]
    d = [4.0, 0.0, 1.0, 0.0, 0.0, 5.0]
    sc = _scores([h], [d])
    mask = torch.ones(1, 6, dtype=torch.bool)
    # hand: q98 = 0.4 + 0.9*(1.0-0.4) = 0.94 (position 0.98*5 = 4.9) -> h clipped = [0,.1,.2,.3,.4,.94]
    hc = [0.0, 0.1, 0.2, 0.3, 0.4, 0.94]
    hp = [x / 0.94 for x in hc]
    dp = [x / 5.0 for x in d]
    assert len(set(s_ for s_ in [a + b - a * b for a, b in zip(hp, dp)])) == 6  # no ties
    s = [a + b - a * b for a, b in zip(hp, dp)]
    order = sorted(range(6), key=lambda i: -s[i])
    for ratio, k in [(0.2, 1), (0.34, 2), (0.5, 3), (1.0, 6)]:
        out, st = select(sc, mask, "soft_or", ratio)
        assert st.kept_tokens == k == int(out.sum())
        assert set(torch.nonzero(out[0]).flatten().tolist()) == set(order[:k])
    # values of the score itself
    from scrimp.tip import soft_or_score
    got = soft_or_score(torch.tensor(h), torch.tensor(d))
    assert torch.allclose(got, torch.tensor(s), atol=1e-6)


def test_q98_clipping_matters():
    # one outlier entropy: without clipping the rest would be squashed to ~0
    h = torch.tensor([[0.1] * 49 + [0.9] + [0.2] * 50])
    d = torch.zeros_like(h)
    mask = torch.ones_like(h, dtype=torch.bool)
    from scrimp.tip import clipped_entropy
    hp = clipped_entropy(h.flatten())
    q = torch.quantile(h.flatten().double(), 0.98).item()
    assert q == pytest.approx(0.2)
    assert hp.max().item() == pytest.approx(1.0)
    assert hp[49].item() == pytest.approx(1.0)  # the outlier is clipped to the top
    assert hp[50].item() == pytest.approx(1.0)
    assert hp[0].item() == pytest.approx(0.0)
    out, _ = select(TipScores(h, d), mask, "soft_or", 0.5)
    assert out.sum() == 50


def test_q3_and_divergence_hand():
    h = [[0.9, 0.0, 0.05, 0.5, 0.0]]
    d = [[0.1, 0.2, 3.0, 0.0, 0.4]]
    f = [[4.0, 1.0, 0.5, 3.0, 2.0]]
    sc = _scores(h, d, f)
    mask = torch.ones(1, 5, dtype=torch.bool)
    hv = torch.tensor(h[0])
    q = torch.quantile(hv.double(), 0.98).item()
    hc = [min(x, q) for x in h[0]]
    hp = [(x - min(hc)) / (max(hc) - min(hc)) for x in hc]
    s = [fv * (1 - a) for fv, a in zip(f[0], hp)]
    out, st = select(sc, mask, "q3", 0.4)
    assert st.kept_tokens == 2
    assert set(torch.nonzero(out[0]).flatten().tolist()) == set(sorted(range(5), key=lambda i: -s[i])[:2])
    out, _ = select(sc, mask, "divergence", 0.4)
    assert set(torch.nonzero(out[0]).flatten().tolist()) == {2, 4}


def test_response_mask_respected_and_floor():
    torch.manual_seed(0)
    h = torch.rand(3, 7)
    d = torch.rand(3, 7) * 3
    f = torch.rand(3, 7)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:] = True
    mask[2, :4] = True  # m = 9
    # a big score outside the mask must never be picked
    d[1, :] = 100.0
    h[1, :] = 1.0
    for rule in ("soft_or", "entropy", "q3", "divergence", "random", "all"):
        for ratio in (0.01, 0.2, 0.5, 0.99, 1.0):
            out, st = select(TipScores(h, d, f), mask, rule, ratio, torch.Generator().manual_seed(1))
            assert not (out & ~mask).any()
            k = 9 if rule == "all" else max(1, math.floor(ratio * 9))
            assert int(out.sum()) == k == st.kept_tokens
            assert st.response_tokens == 9
            assert st.kept_fraction == pytest.approx(k / 9)


def test_determinism_with_generator():
    torch.manual_seed(0)
    h = torch.rand(4, 50)
    d = torch.rand(4, 50)
    mask = torch.rand(4, 50) > 0.3
    for rule in ("entropy", "random"):
        a, _ = select(TipScores(h, d), mask, rule, 0.3, torch.Generator().manual_seed(7))
        b, _ = select(TipScores(h, d), mask, rule, 0.3, torch.Generator().manual_seed(7))
        c, _ = select(TipScores(h, d), mask, rule, 0.3, torch.Generator().manual_seed(8))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_entropy_sampling_is_proportional():
    # two tokens: h = 0.9 vs 0.1, keep 1; P(first) should be 0.9
    sc = TipScores(torch.tensor([[0.9, 0.1]]), torch.zeros(1, 2))
    mask = torch.ones(1, 2, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    hits = sum(bool(select(sc, mask, "entropy", 0.5, g)[0][0, 0]) for _ in range(2000))
    assert 0.87 < hits / 2000 < 0.93
    # zero-entropy tokens are only taken after all positive ones
    sc = TipScores(torch.tensor([[0.0, 0.3, 0.0, 0.2, 0.0]]), torch.zeros(1, 5))
    mask = torch.ones(1, 5, dtype=torch.bool)
    for seed in range(20):
        out, _ = select(sc, mask, "entropy", 0.4, torch.Generator().manual_seed(seed))
        assert out[0].tolist() == [False, True, False, True, False]
        out, _ = select(sc, mask, "entropy", 0.6, torch.Generator().manual_seed(seed))
        assert out[0, 1] and out[0, 3] and int(out.sum()) == 3


def test_quadrant_stats():
    h = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    d = torch.tensor([[2.0, 0.1, 3.0, 0.2]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    out, st = select(TipScores(h, d), mask, "divergence", 0.5, quadrant_thresholds=(0.5, 1.0))
    # quadrants: tok0 Q1, tok1 Q2, tok2 Q3, tok3 Q4; kept {0, 2}
    assert st.quadrant_all == pytest.approx((0.25, 0.25, 0.25, 0.25))
    assert st.quadrant_kept == pytest.approx((0.5, 0.0, 0.5, 0.0))
    _, st = select(TipScores(h, d), mask, "all", 1.0)  # medians: h 0.5, d 1.1
    assert st.h_threshold == pytest.approx(0.2) or st.h_threshold == pytest.approx(0.5)
    assert sum(st.quadrant_all) == pytest.approx(1.0)
    assert sum(st.quadrant_kept) == pytest.approx(1.0)
    assert "quadrant_kept_q3" in st.as_dict()


def test_bad_inputs():
    sc = _scores([[0.1, 0.2]], [[0.1, 0.2]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    for r in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            select(sc, mask, "soft_or", r)
    with pytest.raises(TypeError):
        select(sc, mask, "soft_or", True)
    with pytest.raises(ValueError, match="rule"):
        select(sc, mask, "softor", 0.5)
    with pytest.raises(ValueError, match="empty"):
        select(sc, torch.zeros(1, 2, dtype=torch.bool), "soft_or", 0.5)
    with pytest.raises(TypeError, match="bool"):
        select(sc, torch.ones(1, 2), "soft_or", 0.5)
    with pytest.raises(ValueError, match="shape"):
        select(sc, torch.ones(2, 2, dtype=torch.bool), "soft_or", 0.5)
    with pytest.raises(ValueError, match="kl_forward"):
        select(sc, mask, "q3", 0.5)
    with pytest.raises(ValueError, match="NaN"):
        select(_scores([[0.1, float("nan")]], [[0.1, 0.2]]), mask, "soft_or", 0.5)
    ts = scrimp.token_scores(torch.randn(1, 2, 5), torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match="vocab_size"):  # a TokenScores built by hand, without its |V|
        select(ts._replace(vocab_size=None), mask, "soft_or", 0.5)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        compute_scores(torch.randn(2, 5), torch.randn(2, 6))


def test_compute_scores_and_token_scores_input():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    sc = compute_scores(s, t)
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    ent = -(ls.exp() * ls).sum(-1) / math.log(11)
    assert torch.allclose(sc.entropy.double(), ent, atol=1e-5)
    assert torch.allclose(sc.kl_reverse.double(), (ls.exp() * (ls - lt)).sum(-1), atol=1e-5)
    assert torch.allclose(sc.kl_forward.double(), (lt.exp() * (lt - ls)).sum(-1), atol=1e-5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    a, _ = select(sc, mask, "soft_or", 0.5)
    b, _ = select(scrimp.token_scores(s, t), mask, "soft_or", 0.5)
    assert torch.equal(a, b)
    assert scrimp.token_scores(s, t).vocab_size == 11


def test_readme_example_token_scores_straight_into_select():
    torch.manual_seed(1)
    student_logits, teacher_logits = torch.randn(2, 8, 13), torch.randn(2, 8, 13)
    response_mask = torch.zeros(2, 8, dtype=torch.bool)
    response_mask[:, 3:] = True
    scores = scrimp.token_scores(student_logits, teacher_logits)
    mask, stats = scrimp.tip.select(scores, response_mask, rule="soft_or", ratio=0.2)
    assert stats.kept_tokens == 2 == int(mask.sum()) and not (mask & ~response_mask).any()
    # the entropy was normalised by log 13: same mask as compute_scores, different with a wrong |V|
    ref, _ = select(compute_scores(student_logits, teacher_logits), response_mask, "soft_or", 0.2)
    assert torch.equal(mask, ref)
    ent = scores.student_entropy / math.log(13)
    h = select({"entropy": ent, "kl_reverse": scores.kl_reverse}, response_mask, "all", 1.0)[1].h_threshold
    assert stats.h_threshold == pytest.approx(h)
