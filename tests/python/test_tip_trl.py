import pytest
import torch

import scrimp
from scrimp.tip import select
from scrimp.tip.trl_hook import tip_generalized_jsd_loss

trl = pytest.importorskip("trl")


def _gkd():
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer


def _data(seed=0, B=3, L=9, V=301):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, L, V, generator=g) * 2
    t = torch.randn(B, L, V, generator=g) * 2
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[:, :3] = -100
    labels[2, -2:] = -100
    return s, t, labels


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_all_tokens_equals_trl(beta):
    s, t, labels = _data()
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = tip_generalized_jsd_loss(a, t, labels, beta=beta, rule="all", ratio=1.0)
    theirs = _gkd().generalized_jsd_loss(b, t, labels=labels, beta=beta)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_selected_tokens_equal_trl_on_the_kept_mask():
    s, t, labels = _data(1)
    loss, stats = tip_generalized_jsd_loss(s, t, labels, beta=1.0, rule="soft_or", ratio=0.4, return_stats=True)
    # redo the selection independently and hand TRL the kept positions as its label mask
    sc = scrimp.tip.compute_scores(s, t)
    kept, st2 = select(sc, labels != -100, "soft_or", 0.4)
    assert stats.kept_tokens == st2.kept_tokens == int(0.4 * int((labels != -100).sum()))
    masked = labels.clone()
    masked[~kept] = -100
    theirs = _gkd().generalized_jsd_loss(s, t, labels=masked, beta=1.0)
    torch.testing.assert_close(loss, theirs, rtol=2e-5, atol=1e-6)
    none = tip_generalized_jsd_loss(s, t, labels, beta=1.0, rule="soft_or", ratio=0.4, reduction="none")
    assert torch.equal(none != 0, kept)


def test_subclass_hook_is_used():
    from scrimp.tip.trl_hook import TipGKDTrainer
    assert issubclass(TipGKDTrainer, _gkd())
    tr = object.__new__(TipGKDTrainer)  # the hook alone, without building a Trainer
    tr.tip_rule, tr.tip_ratio, tr.tip_generator, tr.tip_last_stats = "q3", 0.3, torch.Generator().manual_seed(0), None
    s, t, labels = _data(2)
    loss = tr.generalized_jsd_loss(s, t, labels=labels, beta=0.5)
    assert tr.tip_last_stats.rule == "q3" and tr.tip_last_stats.kept_tokens == int(0.3 * int((labels != -100).sum()))
    assert torch.isfinite(loss)
