"""Helpers shared by the KV Packet tests."""
import torch


def tiny_recall_setup(example_seed: int, context_tokens: int):
    """(model, tokenizer, recall example): a tiny random Llama (3 layers, hidden 64, 4 / 2 heads) with
    the testbed tokenizer, for the KV Packet tests that need a real HF model but no trained weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import scrimp.testbed as tb

    torch.manual_seed(0)
    tok = tb.get_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok, tb.tasks.recall(seed=example_seed, context_tokens=context_tokens, tokenizer=tok)
