"""vLLM's OpenAI server with the KV Packet connector, on 127.0.0.1, driven by the openai client.

The server is vLLM's usual multiprocess engine (scheduler half in the engine core, worker half in its
worker): concurrent requests share documents, a malformed span gets a 400 naming the field and the
server keeps serving, and examples/vllm/packets_client.py runs against it.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import scrimp.testbed as tb
from scrimp.integrations.vllm import packet_request
from scrimp.packets.bench import recall_prompts
from scrimp.packets.method import Adapters, PacketEngine

openai = pytest.importorskip("openai")
pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment tests/run.sh builds")

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECALL_DIR = os.path.join(os.path.dirname(tb.__file__), "checkpoints", "recall")
ADAPTERS = os.path.join(os.path.dirname(tb.__file__), "..", "packets", "adapters", "recall.safetensors")
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    cfg = {"kv_connector": "ScrimpPacketConnector", "kv_connector_module_path": "scrimp.integrations.vllm.connector",
           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
           "kv_connector_extra_config": {"adapters": ADAPTERS,
                                         "store_path": str(tmp_path_factory.mktemp("server-store"))}}
    log = open(tmp_path_factory.mktemp("server-log") / "server.log", "w+")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", RECALL_DIR, "--served-model-name",
         "recall", "--dtype", "float32", "--enforce-eager", "--max-model-len", "3072", "--host", "127.0.0.1",
         "--port", str(port), "--kv-transfer-config", json.dumps(cfg),
         "--middleware", "scrimp.integrations.vllm.server.check_document_spans"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the vLLM server exited with {proc.returncode} at start:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"the vLLM server did not answer /health within {START_TIMEOUT_S} s:\n{log.read()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def test_concurrent_requests_share_packets_and_match_packet_engine(server):
    model, tok = tb.load("recall")
    adapters = Adapters.load(ADAPTERS, model)
    base = recall_prompts(tok, 4, seed=1)
    # 8 requests over the documents of 4 prompts: each prompt twice, the second time its documents reversed
    prompts = []
    for p in base:
        prompts.append(p)
        q = type(p)(p.prefix, list(reversed(p.documents)), p.question, p.answer)
        prompts.append(q)
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=120)

    def ask(p):
        r = packet_request(p, adapters.n_header, adapters.n_trailer)
        out = client.completions.create(model="recall", prompt=r["prompt_token_ids"], max_tokens=8, temperature=0,
                                        extra_body={"kv_transfer_params": r["kv_transfer_params"],
                                                    "return_token_ids": True})
        return out

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(ask, prompts))
    eng = PacketEngine(model, tok, adapters, positions="slots")
    for p, out in zip(prompts, outs):
        want = tok.decode(eng.answer(prompt=p, max_new_tokens=8).token_ids, skip_special_tokens=True)
        assert out.choices[0].text == want
        details = out.usage.prompt_tokens_details
        if details is not None and details.cached_tokens is not None:
            assert details.cached_tokens == out.usage.prompt_tokens - len(p.question)


def test_malformed_spans_get_400_naming_the_field_and_serving_goes_on(server):
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match=r"scrimp_documents\[1\]"):
        client.completions.create(model="recall", prompt=list(range(3, 60)), max_tokens=2,
                                  extra_body={"kv_transfer_params": {"scrimp_documents": [[0, 10], [5, 20]]}})
    ok = client.completions.create(model="recall", prompt=list(range(3, 60)), max_tokens=2, temperature=0)
    assert ok.choices[0].text is not None


def test_the_client_example_runs(server):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "vllm", "packets_client.py"),
                          "--base-url", server, "--model", "recall", "--adapters", ADAPTERS],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 2 and lines[0]["answer"] == lines[1]["answer"]
