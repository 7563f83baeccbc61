"""Pruned KV packets: the kept tokens' K/V are exactly the full packet's, adapters are always kept,
assembly keeps the plain-prompt positions (the pruned cache equals the full cache with the dropped
tokens removed), pruned packets have their own key and survive a reopened disk tier, bad input."""
import pytest
import torch

import scrimp
from packets_helpers import tiny_recall_setup
from scrimp.packets import method as M
from scrimp.packets.compare import pruning_of
from scrimp.packets.bench import split_recall_prompt
from scrimp.packets.prune import Pruning, attention_scores
from scrimp.packets.store import packet_key


@pytest.fixture(scope="module")
def setup():
    return tiny_recall_setup(2, 220)


def test_pruning_arguments_are_checked():
    for bad in (dict(score="norm"), dict(score=3), dict(keep=0), dict(keep=1.5), dict(keep=True),
                dict(keep="0.5"), dict(window=0), dict(window=2.0)):
        with pytest.raises(ValueError):
            Pruning(**bad)
    assert Pruning("key_norm", 0.5).rule == "key_norm:0.5"
    assert Pruning("attention", 0.25, window=4).rule == "attention:0.25:w4"
    assert Pruning(keep=0.5).n_keep(7) == 4 and Pruning(keep=0.01).n_keep(7) == 1 and Pruning(keep=1.0).n_keep(7) == 7


def test_kept_holds_every_adapter_token_and_the_best_document_tokens():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, -1.0])  # ties go to the earlier token
    assert Pruning(keep=0.4).kept(scores, n_header=2, n_trailer=3) == [0, 1, 3, 5, 7, 8, 9]
    assert Pruning(keep=1.0).kept(scores, 0, 0) == [0, 1, 2, 3, 4]


def test_engine_rejects_a_non_pruning(setup):
    model, tok, _ = setup
    with pytest.raises(TypeError):
        M.PacketEngine(model, tok, None, pruning="key_norm")
    with pytest.raises(TypeError):
        M.build_pruned_packet_kv(model, [5, 6, 7], None, 0.5)


@pytest.mark.parametrize("score", ["key_norm", "attention"])
@pytest.mark.parametrize("with_adapters", [False, True])
def test_pruned_cache_is_the_full_cache_without_the_dropped_tokens(setup, score, with_adapters):
    model, tok, ex = setup
    ad = M.Adapters(model.config.hidden_size, seed=5) if with_adapters else None
    pr = Pruning(score, keep=0.6, window=4)
    full = M.PacketEngine(model, tok, ad)
    pruned = M.PacketEngine(model, tok, ad, pruning=pr)
    prompt = split_recall_prompt(ex.prompt_ids, tok)
    cache_f, n_f, q_f, kv_f, docs, prefix = full.prepare(prompt)
    cache_p, n_p, q_p, kv_p, _, _ = pruned.prepare(prompt)
    assert (n_p, q_p) == (n_f, q_f)  # same positions for the question
    nh = ad.n_header if ad else 0
    nt = ad.n_trailer if ad else 0
    # which assembled rows of the full cache the pruned one holds: prefix, then each packet's kept rows
    rows, off = list(range(len(prefix))), len(prefix)
    for d in docs:
        p = pruned.packet(d)
        assert p.pruned and p.meta["pruning"] == pr.rule
        assert p.token_ids == pruned._packet_tokens(d)  # the whole document stays the packet's identity
        kept = p.kept
        assert kept[:nh] == list(range(nh)) and kept[len(kept) - nt:] == list(range(nh + len(d), nh + len(d) + nt))
        assert len(kept) == nh + nt + pr.n_keep(len(d))
        assert p.positions == [p.position_start + i for i in kept]
        # the kept tokens' K/V are exactly the full packet's
        fp = full.packet(d)
        idx = torch.tensor(kept)
        for l in range(model.config.num_hidden_layers):
            assert torch.equal(p.keys(l), fp.keys(l).index_select(2, idx))
            assert torch.equal(p.values(l), fp.values(l).index_select(2, idx))
        assert p.key != fp.key
        rows += [off + i for i in kept]
        off += nh + len(d) + nt
        p.release()
        fp.release()
    idx = torch.tensor(rows)
    for l in range(model.config.num_hidden_layers):
        assert torch.equal(kv_p.keys[l], kv_f.keys[l].index_select(2, idx))
        assert torch.equal(kv_p.values[l], kv_f.values[l].index_select(2, idx))
    # the question sees exactly that cache
    from transformers import DynamicCache
    ref = DynamicCache(ddp_cache_data=[(k.index_select(2, idx), v.index_select(2, idx))
                                       for k, v in zip(kv_f.keys, kv_f.values)])
    a = M._question_logits(model, cache_p, n_p, q_p)
    b = M._question_logits(model, ref, n_f, q_f)
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("with_adapters", [False, True])
def test_attention_scores_equal_the_eager_attention_weights(setup, with_adapters):
    # the scores are recomputed from the prefill's hidden states and cached keys; the reference is
    # the model's own eager attention (output_attentions), float32
    model, tok, ex = setup
    docs = split_recall_prompt(ex.prompt_ids, tok).documents
    ad = M.Adapters(model.config.hidden_size, seed=1) if with_adapters else None
    nh, nt = (ad.n_header, ad.n_trailer) if ad else (0, 0)
    start, end, window = nh, nh + len(docs[0]), 5
    impl = model.config._attn_implementation
    layers, hidden, pos = M._wrapped_prefill(model, docs[0], ad, hidden_states=True)
    s = attention_scores(model, hidden, layers, pos, start, end, window, nt)
    assert model.config._attn_implementation == impl
    x = M._embed(model, torch.tensor([docs[0]]))
    x = ad.wrap(x) if ad else x
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            att = model(inputs_embeds=x, position_ids=pos, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(impl)
    w0 = x.shape[1] - nt if nt else end - window
    want = torch.stack([a[0, :, w0:, start:end].double().mean(dim=(0, 1)) for a in att]).mean(0)
    assert s.shape == (len(docs[0]),) and (s >= 0).all() and float(s.sum()) <= 1 + 1e-5
    torch.testing.assert_close(s.double(), want, rtol=1e-4, atol=1e-6)


def test_attention_scores_reject_an_unknown_model(setup):
    model, tok, ex = setup
    with pytest.raises(ValueError, match="cannot find its decoder stack"):
        attention_scores(torch.nn.Linear(2, 2), [], [], torch.zeros(1, 3, dtype=torch.long), 0, 2, 2, 0)


def test_pruned_packets_on_a_reopened_disk_tier(setup, tmp_path):
    model, tok, ex = setup
    pr = Pruning("key_norm", keep=0.5)
    docs = split_recall_prompt(ex.prompt_ids, tok).documents
    st = scrimp.PacketStore(path=str(tmp_path), host_bytes=0, fsync=False)
    eng = M.PacketEngine(model, tok, None, store=st, pruning=pr)
    p = eng.packet(docs[0])
    key, kept, k0 = p.key, p.kept, p.keys(0).clone()
    p.release()
    assert key == packet_key(docs[0], eng.fingerprint, "none", pr.rule)
    assert key != packet_key(docs[0], eng.fingerprint, "none")
    del eng, st
    st = scrimp.PacketStore(path=str(tmp_path), host_bytes=1 << 20, verify_on_open=True)
    assert st.messages() == []
    with st.get(key) as q:
        assert q.kept == kept and q.meta["pruning"] == pr.rule and torch.equal(q.keys(0), k0)


def test_store_put_checks_kept_and_pruning():
    st = scrimp.PacketStore()
    kv = [(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))]
    ids = [5, 6, 7, 8, 9]
    key = st.put(kv, ids, model_fingerprint="m", kept=[0, 2, 4], pruning="key_norm:0.6")
    assert key == packet_key(ids, "m", "", "key_norm:0.6")
    for kw, err in ((dict(kept=[0, 2, 2], pruning="r"), ValueError), (dict(kept=[0, 2, 9], pruning="r"), ValueError),
                    (dict(kept=[0, 1], pruning="r"), ValueError), (dict(kept=[0, 1, 2]), ValueError),
                    (dict(pruning="r"), ValueError), (dict(kept=[0, 1, 2], pruning=3), TypeError),
                    (dict(kept=[0.0, 1, 2], pruning="r"), TypeError)):
        with pytest.raises(err):
            st.put(kv, ids, model_fingerprint="m", **kw)
    assert st.stats()["packets"] == 1
    with pytest.raises(TypeError):
        packet_key(ids, "m", "", pruning=None)


def test_compare_method_names():
    assert pruning_of("kvpacket") is None and pruning_of("cacheblend-10") is None
    assert pruning_of("kvpacket-knorm-50") == Pruning("key_norm", 0.5)
    assert pruning_of("kvpacket-attn-75") == Pruning("attention", 0.75)
    with pytest.raises(ValueError):
        pruning_of("kvpacket-attn-0")


def test_attention_pruning_from_many_threads_at_once(setup):
    # scoring touches no model-wide state (no switch to eager attention), so concurrent builds all
    # get the single-threaded packet
    import threading

    model, tok, ex = setup
    doc = list(ex.prompt_ids[5:60])
    pr = Pruning("attention", keep=0.5, window=4)
    want_kv, want_kept = M.build_pruned_packet_kv(model, doc, None, pr)
    impl = model.config._attn_implementation
    errors, results = [], []

    def work():
        try:
            for _ in range(4):
                results.append(M.build_pruned_packet_kv(model, doc, None, pr))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 16 and model.config._attn_implementation == impl
    for kv, kept in results:
        assert kept == want_kept
        for (k, v), (wk, wv) in zip(kv, want_kv):
            torch.testing.assert_close(k, wk)
            torch.testing.assert_close(v, wv)
