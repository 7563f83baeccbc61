import pytest
import torch

import scrimp
from scrimp.tip.step import plain_loss, prediction_positions, tip_loss

transformers = pytest.importorskip("transformers")


def tiny_qwen3(seed, vocab=97, hidden=32, layers=2):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=128,
                      tie_word_embeddings=False)
    m = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # a sharper, non-trivial output distribution
        m.lm_head.weight.mul_(20.0)
    return m.eval()


def _batch(vocab=97, B=3, L=12, prompt=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    resp = torch.zeros(B, L, dtype=torch.bool)
    resp[:, prompt:] = True
    resp[1, -3:] = False  # a shorter response (padding at the end)
    attn[1, -3:] = 0
    return ids, attn, resp


def test_all_tokens_equals_plain_step_loss_and_grads():
    s, t = tiny_qwen3(0), tiny_qwen3(1)
    ids, attn, resp = _batch()
    out = tip_loss(s, t, ids, attn, resp, rule="all", ratio=1.0, chunk_tokens=5)
    out.loss.backward()
    g_lean = {n: p.grad.clone() for n, p in s.named_parameters()}
    s.zero_grad()
    ref = plain_loss(s, t, ids, attn, resp)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in s.named_parameters():
        torch.testing.assert_close(g_lean[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert out.stats.kept_fraction == 1.0
    assert torch.equal(out.kept, resp)


def test_selected_subset_loss_matches_masked_reference():
    s, t = tiny_qwen3(0), tiny_qwen3(1)
    ids, attn, resp = _batch(seed=3)
    out = tip_loss(s, t, ids, attn, resp, rule="soft_or", ratio=0.3, chunk_tokens=4)
    m = int(resp.sum())
    assert int(out.kept.sum()) == int(0.3 * m)
    assert not (out.kept & ~resp).any()
    # reference: full logits, reverse KL averaged over the kept tokens only
    with torch.no_grad():
        ls = s(input_ids=ids, attention_mask=attn).logits.double()
        lt = t(input_ids=ids, attention_mask=attn).logits.double()
    pred = prediction_positions(out.kept)
    ref = scrimp.distill_loss.kl_loss_reference(ls[pred], lt[pred], "reverse")
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-4, atol=1e-6)
    # the scores are those of the response tokens
    sc = scrimp.tip.compute_scores(ls[prediction_positions(resp)].float(), lt[prediction_positions(resp)].float())
    torch.testing.assert_close(out.scores.kl_reverse[resp], sc.kl_reverse, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.scores.entropy[resp], sc.entropy, rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    s, t = tiny_qwen3(0), tiny_qwen3(1, vocab=101)
    ids, attn, resp = _batch()
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        tip_loss(s, t, ids, attn, resp)
    with pytest.raises(ValueError, match="empty"):
        tip_loss(s, tiny_qwen3(1), ids, attn, torch.zeros_like(resp))


def test_lean_step_peak_memory_falls_with_the_kept_fraction():
    from scrimp.tip.memory import measure_step_memory
    shape = dict(vocab=32000, hidden=32, batch=2, prompt=16, response=192, dtype="bfloat16", threads=1, chunk=64)
    plain = measure_step_memory("plain", "all", 1.0, **shape)["peak_step_bytes"]
    lean_all = measure_step_memory("lean", "all", 1.0, **shape)["peak_step_bytes"]
    lean_20 = measure_step_memory("lean", "soft_or", 0.2, **shape)["peak_step_bytes"]
    fp32_logits = 2 * 192 * 32000 * 4
    assert plain > 2 * fp32_logits  # the anchor really keeps several float32 [N, V] buffers
    assert lean_all < 0.6 * plain
    assert lean_20 < 0.6 * lean_all
