"""Pruned KV packets: the kept tokens' K/V are exactly the full packet's, adapters are always kept,
assembly keeps the plain-prompt positions (the pruned cache equals the full cache with the dropped
tokens removed), pruned packets have their own key and survive a reopened disk tier, bad input."""
import pytest
import torch

import scrimp
import scrimp.testbed as tb
from packets_helpers import tiny_recall_setup
from scrimp.packets import method as M
from scrimp.packets.compare import pruning_of
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
        M.build_packet_kv(model, [5, 6, 7], None, pruning=0.5)


@pytest.mark.parametrize("score", ["key_norm", "attention"])
@pytest.mark.parametrize("with_adapters", [False, True])
def test_pruned_cache_is_the_full_cache_without_the_dropped_tokens(setup, score, with_adapters):
    model, tok, ex = setup
    ad = M.Adapters(model.config.hidden_size, seed=5) if with_adapters else None
    pr = Pruning(score, keep=0.6, window=4)
    full = M.PacketEngine(model, tok, ad)
    pruned = M.PacketEngine(model, tok, ad, pruning=pr)
    cache_f, n_f, q_f, kv_f, docs, prefix = full.prepare(ex.prompt_ids)
    cache_p, n_p, q_p, kv_p, _, _ = pruned.prepare(ex.prompt_ids)
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


def test_attention_scores_are_attention_shares_and_restore_the_implementation(setup):
    model, tok, ex = setup
    _, docs, _ = M.split_prompt(ex.prompt_ids, tok)
    ad = M.Adapters(model.config.hidden_size, seed=1)
    x = ad.wrap(M._embed(model, torch.tensor([docs[0]])))
    pos = torch.arange(x.shape[1])[None]
    impl = model.config._attn_implementation
    s = attention_scores(model, x, pos, ad.n_header, ad.n_header + len(docs[0]), None, ad.n_trailer)
    assert model.config._attn_implementation == impl
    assert s.shape == (len(docs[0]),) and (s >= 0).all() and float(s.sum()) <= 1 + 1e-5


def test_pruned_packets_on_a_reopened_disk_tier(setup, tmp_path):
    model, tok, ex = setup
    pr = Pruning("key_norm", keep=0.5)
    _, docs, _ = M.split_prompt(ex.prompt_ids, tok)
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
