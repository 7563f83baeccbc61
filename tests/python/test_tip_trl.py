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


# ----------------------------------------------------------------------------- the lean trainer, built by TRL

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import os
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from hf_models import make_checkpoint
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("trl_pair")
    s = make_checkpoint("qwen2", root, name="student")
    # GKDTrainer requires equal config vocab sizes: the Llama teacher's head gets the Qwen2 student's 513 rows
    t = make_checkpoint("llama3", root, name="teacher", seed=1, hidden_size=96, intermediate_size=192, pad_vocab_to=513)
    AutoTokenizer.from_pretrained(s).save_pretrained(t)  # one shared tokenizer
    return s, t


def _dataset(n=8):
    from datasets import Dataset
    from hf_models import corpus
    lines = corpus(2 * n, seed=5)
    return Dataset.from_list([{"messages": [{"role": "user", "content": lines[2 * i]},
                                            {"role": "assistant", "content": lines[2 * i + 1]}]} for i in range(n)])


def _trainer(cls, pair, out, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig
    s, t = pair
    torch.manual_seed(0)
    args = GKDConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=kw.pop("max_steps", 2),
                     lmbda=kw.pop("lmbda", 1.0), beta=kw.pop("beta", 0.5), max_new_tokens=6, temperature=1.0,
                     report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-3,
                     disable_tqdm=True, max_length=64, seed=0)
    return cls(model=AutoModelForCausalLM.from_pretrained(s), teacher_model=AutoModelForCausalLM.from_pretrained(t),
               args=args, train_dataset=_dataset(), processing_class=AutoTokenizer.from_pretrained(s), **kw)


def test_lean_trainer_trains_with_trl_machinery(pair, tmp_path):
    from scrimp.tip.trl_hook import TipGKDTrainer
    tr = _trainer(TipGKDTrainer, pair, tmp_path, tip_rule="soft_or", tip_ratio=0.5)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()  # on-policy rollouts (lmbda=1), accumulation and the optimizer are TRL's own
    assert tr.state.global_step == 2
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(x == x and x >= 0 for x in losses)
    st = tr.tip_last_stats
    assert st.rule == "soft_or" and st.kept_tokens == max(1, int(0.5 * st.response_tokens))
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def test_lean_trainer_all_tokens_equals_gkd_loss_and_gradients(pair, tmp_path):
    from scrimp.tip.trl_hook import TipGKDTrainer
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(pair[0])
    ours = _trainer(TipGKDTrainer, pair, tmp_path / "a", tip_rule="all", tip_ratio=1.0, lmbda=0.0)
    batch = ours.data_collator([_dataset()[i] for i in range(3)])
    loss = ours.compute_loss(ours.model, batch)
    loss.backward()
    g_ours = {n: p.grad.clone() for n, p in ours.model.named_parameters()}
    # the reference: TRL's generalized_jsd_loss on the models' full logits over the tokenizer's vocabulary
    ours.model.zero_grad()
    V = len(tok)
    s_logits = ours.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    with torch.no_grad():
        t_logits = ours.teacher_model(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).logits[:, :-1, :V]
    ref = _gkd().generalized_jsd_loss(s_logits, t_logits, labels=batch["labels"][:, 1:], beta=0.5)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
    for n, p in ours.model.named_parameters():
        # fp32 sums in another order: entries far below the tensor's largest gradient differ by ~1e-6 absolute
        torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-4, atol=1e-6 + 3e-3 * float(p.grad.abs().max()),
                                   msg=lambda m: f"{n}: {m}")
