"""TIP beyond the testbed: random-weight Qwen2 / Llama / Gemma2 / Granite checkpoints with a BPE tokenizer
trained in the test. ``scrimp tip distill`` on a prompts JSONL, padded LM heads, logit transforms (soft-capping,
scaling) against the models' own logits, tokenizers that disagree, malformed prompt files, out-of-memory steps."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from hf_models import make_checkpoint  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """student: Qwen2 (tokenizer of 513 tokens, head 513 rows); teacher: a wider Llama with the student's
    tokenizer; the *-pad pair: heads padded to 576 rows over the same 513-token tokenizer; llama-own: a
    Llama with its own 512-token tokenizer (disagrees with the student's at id 512)."""
    from transformers import AutoTokenizer
    root = tmp_path_factory.mktemp("tip_ckpts")
    p = {"student": make_checkpoint("qwen2", root, name="student"),
         "student-pad": make_checkpoint("qwen2", root, name="student-pad", pad_vocab_to=64),
         "teacher": make_checkpoint("llama3", root, name="teacher", seed=1, hidden_size=96, intermediate_size=192,
                                    pad_vocab_to=513),
         "teacher-pad": make_checkpoint("llama3", root, name="teacher-pad", seed=1, pad_vocab_to=96),
         "llama-own": make_checkpoint("llama3", root, name="llama-own", seed=2)}
    tok = AutoTokenizer.from_pretrained(p["student"])
    for name in ("teacher", "teacher-pad"):
        tok.save_pretrained(p[name])
    p["root"] = str(root)
    return p


def _prompts(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


GOOD = [{"prompt": "the river and the mountain"}, {"messages": [{"role": "user", "content": "compute seven"}]},
        {"prompt": "select a token", "answer": 3}, "", {"prompt": "train the student"}]


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "import sys; from scrimp.cli import main; sys.exit(main(sys.argv[1:]))",
                           "tip", "distill", *args], env=ENV, capture_output=True, text=True, timeout=300)


def test_cli_distills_on_a_prompts_file_and_writes_a_loadable_checkpoint(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    prompts = _prompts(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "run"
    r = _cli("--student", ckpts["student"], "--teacher", ckpts["teacher"], "--prompts", prompts, "--out", str(out),
             "--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--max-new-tokens", "6", "--top-p", "0.9",
             "--temperature", "0.8", "--checkpoint-every", "2", "--device", "cpu", "--dtype", "float32", "--quiet",
             "--json", str(tmp_path / "r.json"), "--seed", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.load(open(tmp_path / "r.json"))
    assert rep["steps"] == 3 and len(rep["history"]) == 3 and rep["checkpoint"].endswith("checkpoint-3")
    for rec in rep["history"]:
        assert rec["response_tokens"] > 0 and 0 < rec["kept_fraction"] <= 1 and rec["loss"] >= 0
    assert sorted(os.listdir(out)) == ["checkpoint-3", "metrics.jsonl"]
    m = AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    tok = AutoTokenizer.from_pretrained(out / "checkpoint-3")
    s0 = AutoModelForCausalLM.from_pretrained(ckpts["student"])
    assert type(m).__name__ == "Qwen2ForCausalLM" and len(tok) == 513
    assert any(not torch.equal(a, b) for a, b in zip(m.parameters(), s0.parameters()))  # it trained
    # the prompts were rendered with the student's chat template
    from scrimp.tip import load_prompts
    ids = load_prompts(prompts, tok)
    assert len(ids) == 4 and tok.decode(ids[0]).startswith("<|user|>the river") and ids[0][-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_padded_heads_train_over_the_tokenizer_vocabulary(ckpts):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from scrimp.tip import OnPolicyDistiller, prompt_source, load_prompts, tip_loss
    s = AutoModelForCausalLM.from_pretrained(ckpts["student-pad"])
    t = AutoModelForCausalLM.from_pretrained(ckpts["teacher-pad"])
    tok = AutoTokenizer.from_pretrained(ckpts["student-pad"])
    assert s.lm_head.weight.shape[0] == t.lm_head.weight.shape[0] == 576 and len(tok) == 513
    # the loss is the full-logits reference sliced to the tokenizer's 513 columns
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 513, (2, 10), generator=g)
    attn = torch.ones_like(ids)
    resp = torch.zeros(2, 10, dtype=torch.bool)
    resp[:, 4:] = True
    out = tip_loss(s, t, ids, attn, resp, rule="all", ratio=1.0, vocab_size=len(tok))
    with torch.no_grad():
        ls = s(input_ids=ids, attention_mask=attn).logits[:, 3:9, :513].double()
        lt = t(input_ids=ids, attention_mask=attn).logits[:, 3:9, :513].double()
    from scrimp.distill_loss import kl_loss_reference
    torch.testing.assert_close(out.loss.double(), kl_loss_reference(ls, lt), rtol=1e-4, atol=1e-6)
    out.loss.backward()
    assert float(s.lm_head.weight.grad[513:].abs().max()) == 0.0  # padded rows never enter the loss
    assert float(s.lm_head.weight.grad[:513].abs().max()) > 0.0
    # heads of different sizes (513 vs 576 rows) over one tokenizer train too
    s2 = AutoModelForCausalLM.from_pretrained(ckpts["student"])
    d = OnPolicyDistiller(s2, t, tok, teacher_tokenizer=AutoTokenizer.from_pretrained(ckpts["teacher-pad"]),
                          batch_size=2, max_new_tokens=5, progress=False)
    hist = d.train(2, prompt_source(load_prompts(_prompts_tmp(ckpts), tok)))
    assert len(hist) == 2 and all(r["loss"] >= 0 for r in hist)
    with pytest.raises(ValueError, match="vocabulary mismatch"):  # no tokenizer length: which rows are real?
        tip_loss(s2, t, ids, attn, resp)


def _prompts_tmp(ckpts):
    return _prompts(os.path.join(ckpts["root"], "good.jsonl"), GOOD)


def test_tokenizers_that_disagree_name_the_first_differing_token(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from scrimp.tip import OnPolicyDistiller, check_same_vocabulary
    a, b = AutoTokenizer.from_pretrained(ckpts["student"]), AutoTokenizer.from_pretrained(ckpts["llama-own"])
    with pytest.raises(ValueError, match=r"token id 512 is '<\|endoftext\|>' for the student and None for the teacher"):
        check_same_vocabulary(a, b)
    with pytest.raises(ValueError, match="token id 512"):
        OnPolicyDistiller(AutoModelForCausalLM.from_pretrained(ckpts["student"]),
                          AutoModelForCausalLM.from_pretrained(ckpts["llama-own"]), a, teacher_tokenizer=b)
    r = _cli("--student", ckpts["student"], "--teacher", ckpts["llama-own"], "--prompts", _prompts_tmp(ckpts),
             "--steps", "1", "--quiet", "--device", "cpu")
    assert r.returncode == 2 and "token id 512" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("lines, match", [
    (["{\"prompt\": \"ok\"}", "{\"prompt\": 3}"], r"p\.jsonl:2: \"prompt\" must be a non-empty string"),
    (["{\"prompt\": \"ok\"}", "", "not json"], r"p\.jsonl:3: not valid JSON .*expected a JSON object \{\"prompt\": str\}"),
    (["[1, 2]"], r"p\.jsonl:1: got a JSON list; expected"),
    (["{\"text\": \"x\"}"], r"p\.jsonl:1: neither \"prompt\" and \"messages\""),
    (["{\"prompt\": \"a\", \"messages\": []}"], r"p\.jsonl:1: both"),
    (["{\"messages\": [{\"role\": \"user\"}]}"], r"p\.jsonl:1: messages\[0\] must be"),
    (["{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}"],
     r"p\.jsonl:1: the last message is the assistant's"),
    ([""], r"no usable lines"),
])
def test_malformed_prompt_files(ckpts, tmp_path, lines, match):
    from transformers import AutoTokenizer
    from scrimp.tip import load_prompts
    path = _prompts(tmp_path / "p.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        load_prompts(path, AutoTokenizer.from_pretrained(ckpts["student"]))


def test_malformed_prompt_file_from_the_cli(ckpts, tmp_path):
    path = _prompts(tmp_path / "p.jsonl", ["{\"prompt\": \"ok\"}", "{\"prompt\": \"ok\"", "{\"prompt\": \"ok\"}"])
    r = _cli("--student", ckpts["student"], "--teacher", ckpts["teacher"], "--prompts", path, "--steps", "1",
             "--quiet", "--device", "cpu")
    assert r.returncode == 2 and "p.jsonl:2: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    tok_free = tmp_path / "nochat.jsonl"
    from transformers import AutoTokenizer
    from scrimp.tip import load_prompts
    tok = AutoTokenizer.from_pretrained(ckpts["student"])
    tok.chat_template = None
    _prompts(tok_free, [{"prompt": "plain text"}, {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ValueError, match=r"nochat\.jsonl:2: \"messages\" need a chat template"):
        load_prompts(str(tok_free), tok)


def test_prompt_source_is_deterministic_and_disjoint_across_ranks():
    from scrimp.tip import prompt_source
    prompts = [[i] for i in range(10)]
    a0, a1 = prompt_source(prompts, seed=1, rank=0, world=2), prompt_source(prompts, seed=1, rank=1, world=2)
    first = a0(0, 2) + a1(0, 2) + a0(1, 2) + a1(1, 2) + a0(2, 2)
    assert sorted(x[0] for x in first) == list(range(10))  # one epoch, no prompt twice
    assert prompt_source(prompts, seed=1, rank=0, world=2)(1, 2) == a0(1, 2)
    assert prompt_source(prompts, seed=2, rank=0, world=2)(0, 5) != a0(0, 5)


# ----------------------------------------------------------------------------- logit transforms

def _logits_match(model, vocab=None):
    from scrimp.tip.head import LogitHead
    from scrimp.tip.step import hidden_states
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 9), generator=g)
    attn = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn).logits
        ours = LogitHead(model, vocab)(hidden_states(model, ids, attn))
    torch.testing.assert_close(ours, ref if vocab is None else ref[..., :vocab], rtol=1e-5, atol=1e-5)
    return ref


def test_final_logit_softcapping_as_the_model_forward(tmp_path):
    from transformers import AutoModelForCausalLM
    path = make_checkpoint("gemma2", tmp_path, final_logit_softcapping=2.0)
    m = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)  # logits well past the cap: the tanh matters
    ref = _logits_match(m)
    assert float(ref.abs().max()) < 2.0 and float(ref.abs().max()) > 1.5
    from scrimp.tip import tip_loss
    from scrimp.distill_loss import kl_loss_reference
    t = AutoModelForCausalLM.from_pretrained(make_checkpoint("gemma2", tmp_path, seed=1, final_logit_softcapping=2.0))
    ids = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(1))
    resp = torch.zeros(2, 8, dtype=torch.bool)
    resp[:, 3:] = True
    out = tip_loss(m, t, ids, torch.ones_like(ids), resp, rule="all", ratio=1.0)
    with torch.no_grad():
        lt = t(input_ids=ids).logits[:, 2:7].double()
        ls = m(input_ids=ids).logits[:, 2:7].double()
    torch.testing.assert_close(out.loss.double(), kl_loss_reference(ls, lt), rtol=1e-4, atol=1e-6)


def test_logit_scaling_as_the_model_forward_or_refused(tmp_path):
    import transformers as T
    from scrimp.tip.head import LogitHead
    torch.manual_seed(0)
    granite = T.GraniteForCausalLM(T.GraniteConfig(vocab_size=520, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                    logits_scaling=4.0)).eval()
    ref = _logits_match(granite, vocab=513)  # divided by logits_scaling, and sliced to a 513-token vocabulary
    assert LogitHead(granite, 513).scale == ("div", 4.0)
    cohere = T.CohereForCausalLM(T.CohereConfig(vocab_size=520, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                 logit_scale=0.25)).eval()
    _logits_match(cohere)
    assert LogitHead(cohere).scale == ("mul", 0.25)
    # a scale whose form is unknown is refused by name
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=520, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    llama.config.output_multiplier_scale = 3.0
    with pytest.raises(ValueError, match=r"logit_scale .*output_multiplier_scale=3.0"):
        LogitHead(llama)
    from scrimp.tip import OnPolicyDistiller
    with pytest.raises(ValueError, match="output_multiplier_scale"):
        OnPolicyDistiller(llama, cohere, _FakeTok(520))
    del ref


class _FakeTok:
    def __init__(self, n):
        self.n, self.pad_token_id, self.eos_token_id = n, 0, 1

    def __len__(self):
        return self.n


# ----------------------------------------------------------------------------- out of memory

def test_out_of_memory_step_names_the_sizes_and_keeps_the_checkpoint(ckpts, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from scrimp.tip import OnPolicyDistiller, StepOutOfMemory, load_prompts, prompt_source
    from scrimp.tip import step as step_mod
    tok = AutoTokenizer.from_pretrained(ckpts["student"])
    src = prompt_source(load_prompts(_prompts_tmp(ckpts), tok))

    def make():
        return OnPolicyDistiller(AutoModelForCausalLM.from_pretrained(ckpts["student"]),
                                 AutoModelForCausalLM.from_pretrained(ckpts["teacher"]), tok, batch_size=2,
                                 max_new_tokens=5, progress=False, output_dir=str(tmp_path), checkpoint_every=1)

    d = make()
    d.train(2, src)
    before = open(tmp_path / "checkpoint-2" / "model.safetensors", "rb").read()
    real = step_mod.score_positions

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(step_mod, "score_positions", oom)
    with pytest.raises(StepOutOfMemory, match=r"out of memory on cpu in step 3 \(training\): micro-batch of 2 "
                                              r"rollouts x \d+ tokens \(\d+ response tokens.*checkpoint-2 \(intact\)"):
        d.train(4, src)
    monkeypatch.setattr(step_mod, "score_positions", real)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-2"]
    assert open(tmp_path / "checkpoint-2" / "model.safetensors", "rb").read() == before
    again = make()
    again.train(3, src)  # resumes from the intact checkpoint
    assert again.step_count == 3 and [r["step"] for r in again.history] == [1, 2, 3]
