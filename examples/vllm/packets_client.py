"""Ask a vLLM OpenAI server running scrimp's KV Packet connector about documents, with the openai client.

    python -m vllm.entrypoints.openai.api_server --model MODEL --kv-transfer-config '{...}' \
        --middleware scrimp.integrations.vllm.server.check_document_spans --port 8000
    python examples/vllm/packets_client.py --base-url http://127.0.0.1:8000/v1 --model MODEL --adapters ADAPTERS

Each document becomes a packet the first time the server sees it; the second request reuses the same
documents in another order, so its only prefill is the question. With no arguments but the URL it asks
about testbed recall documents (the model must then be the testbed recall checkpoint).
"""
import argparse
import json

from openai import OpenAI

from scrimp.integrations.vllm import packet_request
from scrimp.packets.method import Adapters
from scrimp.packets.prompt import build_prompt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="recall", help="the served model name; 'recall' (or testbed:recall): ask "
                    "about testbed recall documents, the server must serve the testbed recall checkpoint")
    ap.add_argument("--adapters", default=None, help="the adapter file the server's connector uses")
    args = ap.parse_args()

    import scrimp.testbed as tb
    from scrimp.packets.bench import split_recall_prompt
    from transformers import AutoTokenizer

    if args.model in ("recall", "testbed:recall"):
        import os
        served = args.model
        tok = tb.get_tokenizer()
        ex = tb.tasks.recall(seed=7, context_tokens=1024, tokenizer=tok)
        prompt = split_recall_prompt(ex.prompt_ids, tok)
        adapters = Adapters.load(args.adapters or os.path.join(os.path.dirname(tb.__file__), "..", "packets",
                                                               "adapters", "recall.safetensors"))
    else:
        served = args.model
        tok = AutoTokenizer.from_pretrained(args.model)
        prompt = build_prompt(tok, ["Paris is the capital of France.", "Rome is the capital of Italy."],
                              "What is the capital of Italy?")
        adapters = Adapters.load(args.adapters)

    client = OpenAI(base_url=args.base_url, api_key="unused")
    for order in (prompt.documents, list(reversed(prompt.documents))):
        prompt.documents = order
        req = packet_request(prompt, adapters.n_header, adapters.n_trailer)
        out = client.completions.create(model=served, prompt=req["prompt_token_ids"], max_tokens=8, temperature=0,
                                        extra_body={"kv_transfer_params": req["kv_transfer_params"]})
        print(json.dumps({"answer": out.choices[0].text, "prompt_tokens": out.usage.prompt_tokens,
                          "cached_tokens": getattr(out.usage.prompt_tokens_details, "cached_tokens", None)}))


if __name__ == "__main__":
    main()
