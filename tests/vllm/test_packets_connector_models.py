"""KV Packet inside vLLM on other models and configurations: random-weight architectures with a tokenizer
trained in the test, and what the engine refuses at start. Each engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), one module per pytest process (tests/run.sh)."""
import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest
import torch

from scrimp.integrations.vllm import packet_request
from scrimp.integrations.vllm.worker import PacketWriter
from scrimp.packets.method import Adapters, PacketEngine

pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment tests/run.sh builds")
from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402

from test_packets_connector import ADAPTERS, RECALL_DIR, kv_config  # noqa: E402


def test_bad_configuration_and_foreign_adapters_are_refused_at_start(tmp_path):
    from hf_models import make_checkpoint

    other = make_checkpoint("qwen3", tmp_path)
    with pytest.raises(ValueError, match="were trained for model .* not this model"):
        PacketWriter(other, ADAPTERS, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="kv_load_failure_policy"):
        LLM(model=RECALL_DIR, dtype="float32", enforce_eager=True, max_model_len=1024,
            kv_transfer_config={**kv_config(ADAPTERS), "kv_load_failure_policy": "fail"})


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_random_weight_models_with_a_trained_tokenizer_and_text_documents(tmp_path, arch):
    """Other architectures (Llama-3 rope scaling, Qwen3; random weights, 32-dim heads), a tokenizer trained in
    the test, its chat template, text documents: vLLM + the connector answer as PacketEngine(positions="slots")."""
    from hf_models import make_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scrimp.packets.prompt import build_prompt

    kw = dict(hidden_size=128, head_dim=32) if arch == "llama3" else {}  # vLLM CPU: heads of >= 32
    path = make_checkpoint(arch, tmp_path, seed=3, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    adapters = Adapters(model.config.hidden_size, n_header=4, n_trailer=2, seed=1)
    adapters.save(str(tmp_path / "adapters.safetensors"), model)
    docs = ["The river Alder runs north past the old mill.", "Mira keeps bees behind the school.",
            "Seven lanterns hang over the east gate.", "The ferry leaves at dawn on Sundays."]
    prompts = [build_prompt(tok, [docs[i % 4], docs[(i + 1) % 4], docs[(i + 2) % 4]], f"What is fact {i}?")
               for i in range(4)]
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4,
              enable_prefix_caching=True, kv_transfer_config=kv_config(str(tmp_path / "adapters.safetensors")))
    try:
        reqs = [packet_request(p, adapters.n_header, adapters.n_trailer) for p in prompts]
        outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_token_ids"]) for r in reqs],
                            [SamplingParams(max_tokens=1, temperature=0, logprobs=5,
                                            extra_args={"kv_transfer_params": r["kv_transfer_params"]}) for r in reqs],
                            use_tqdm=False)
        eng = PacketEngine(model, tok, adapters, positions="slots")
        for p, o in zip(prompts, outs):
            assert o.num_cached_tokens == len(o.prompt_token_ids) - len(p.question)
            # random weights give near-flat distributions, where greedy paths part at the first near-tie:
            # compare the first token's top-5 log-probabilities instead (float32, CPU attention vs SDPA)
            ref = torch.log_softmax(eng.first_token_logits(p).double(), -1)
            top = o.outputs[0].logprobs[0]
            assert o.outputs[0].token_ids[0] == int(ref.argmax())
            for tid, lp in top.items():
                assert abs(lp.logprob - float(ref[tid])) < 1e-3, (tid, lp.logprob, float(ref[tid]))
    finally:
        del llm
