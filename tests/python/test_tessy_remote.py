"""TESSY remote backend against real OpenAI-compatible servers on loopback."""
import asyncio
import os
import subprocess
import sys
import time

import pytest

from scrimp.tessy import (BackendError, GenParams, LexiconPredictor, LocalBackend, RemoteBackend, TessyConfig,
                          latest_records, run_synthesis)
from scrimp.tessy.server import create_app

from tessy_helpers import ScriptBackend, ThreadServer, free_port, needs_testbed, tiny_causal_lm

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

GREEDY = GenParams(temperature=0)
PROMPTS = ["<bos>user: Compute 1 + 2\nassistant: <think>", "<bos>user: Compute (3 * 4) - 5\nassistant: <think> Okay"]


def _local(seed):
    model, tok = tiny_causal_lm(seed=seed)
    return LocalBackend(model, tok, name=f"tiny{seed}")


def test_server_and_remote_backend_match_local():
    local = _local(3)
    with ThreadServer(create_app(local, "tiny")) as srv:
        r = httpx.get(srv.url + "/v1/models").json()
        assert r["data"][0]["id"] == "tiny"
        remote = RemoteBackend([srv.url], "tiny", timeout=30)

        async def go():
            try:
                return await asyncio.gather(*[remote.generate(p, 7, GREEDY) for p in PROMPTS])
            finally:
                await remote.aclose()
        res = asyncio.run(go())
        want = local.generate_batch(PROMPTS, 7, GREEDY)
        assert [x.text for x in res] == [x.text for x in want]
        assert all(x.n_tokens == 7 or x.finish_reason == "stop" for x in res)
        # the raw API: a list of prompts, OpenAI error shapes
        j = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": PROMPTS, "max_tokens": 3,
                                                          "temperature": 0}).json()
        assert len(j["choices"]) == 2 and j["object"] == "text_completion"
        e = httpx.post(srv.url + "/v1/completions", json={"model": "other", "prompt": "x"})
        assert e.status_code == 404 and "not served" in e.json()["error"]["message"]
        e = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -1})
        assert e.status_code == 400
        e = httpx.post(srv.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert e.status_code == 400 and "JSON" in e.json()["error"]["message"]


def test_several_endpoints_least_loaded_and_dead_endpoint():
    local = _local(4)
    dead = f"http://127.0.0.1:{free_port()}"
    with ThreadServer(create_app(local, "m")) as a, ThreadServer(create_app(local, "m")) as b:
        remote = RemoteBackend([a.url, b.url, dead], "m", timeout=10, retries=3, backoff=0.01)

        async def go():
            try:
                return await asyncio.gather(*[remote.generate(p, 3, GREEDY) for p in PROMPTS * 6])
            finally:
                await remote.aclose()
        res = asyncio.run(go())
    assert len(res) == 12
    eps = {e.url: e for e in remote.endpoints}
    served = [eps[u].served for u in (a.url + "/v1/completions", b.url + "/v1/completions")]
    assert sum(served) == 12 and min(served) >= 2, served  # load is spread
    assert eps[dead + "/v1/completions"].served == 0 and eps[dead + "/v1/completions"].failures >= 1


def _bad_app():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse
    app = FastAPI()
    state = {"n500": 0}

    @app.post("/e500/v1/completions")
    async def e500():
        state["n500"] += 1
        return JSONResponse(status_code=500, content={"error": {"message": "overloaded"}})

    @app.post("/e400/v1/completions")
    async def e400():
        return JSONResponse(status_code=400, content={"error": {"message": "bad prompt"}})

    @app.post("/garbage/v1/completions")
    async def garbage():
        return PlainTextResponse("<html>not json</html>")

    @app.post("/nochoices/v1/completions")
    async def nochoices():
        return {"id": "x", "choices": []}

    @app.post("/slow/v1/completions")
    async def slow():
        await asyncio.sleep(3)
        return {"choices": [{"text": "late"}]}
    return app, state


def test_http_errors_malformed_replies_timeouts():
    app, state = _bad_app()
    with ThreadServer(app) as srv:
        def gen(path, **kw):
            rb = RemoteBackend([srv.url + path], "m", retries=kw.pop("retries", 2), backoff=0.01, **kw)

            async def go():
                try:
                    return await rb.generate("x", 3, GREEDY)
                finally:
                    await rb.aclose()
            return asyncio.run(go())

        with pytest.raises(BackendError, match="HTTP 500.*overloaded"):
            gen("/e500")
        assert state["n500"] == 3  # retried twice
        t0 = time.time()
        with pytest.raises(BackendError, match="after 1 attempt.*HTTP 400"):
            gen("/e400")  # a client error is not retried
        with pytest.raises(BackendError, match="malformed reply"):
            gen("/garbage")
        with pytest.raises(BackendError, match="malformed reply.*IndexError"):
            gen("/nochoices")
        with pytest.raises(BackendError, match="Timeout"):
            gen("/slow", timeout=0.3, retries=0)
        assert time.time() - t0 < 10


def test_unreachable_endpoint_gives_failure_records(tmp_path):
    out = str(tmp_path / "u.jsonl")
    dead = RemoteBackend([f"http://127.0.0.1:{free_port()}"], "m", retries=1, backoff=0.01, timeout=2)
    from scrimp.testbed import get_tokenizer
    dead.tokenizer = get_tokenizer()
    student = ScriptBackend("S", lambda trace, k: " Okay so 1")
    summ = run_synthesis(["Compute 1 + 2", "Compute 3 + 4"], dead, student, LexiconPredictor("teacher"),
                         LexiconPredictor("student"), TessyConfig(max_retries=1), out_path=out)
    recs = latest_records(out)
    assert summ["failed"] == 2 and len(recs) == 2
    assert all(r["finish_reason"] == "error" and "ConnectError" in r["error"] for r in recs.values())


def _start_server(model, name, port):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "scrimp.tessy.server", "--model", model, "--name", name,
                          "--port", str(port), "--threads", "1"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < 90:
        if p.poll() is not None:
            raise RuntimeError(f"server exited: {p.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.TransportError:
            time.sleep(0.2)
    p.kill()
    raise RuntimeError("server did not come up")


@needs_testbed
def test_remote_end_to_end_with_server_processes(tmp_path):
    """`python -m scrimp.tessy.server` serving the testbed models; TESSY runs through HTTP and
    produces the same records as the local backend (greedy)."""
    from scrimp.testbed import get_tokenizer, tasks
    probs = [{"id": str(i), "prompt": tasks.arith(seed=4242 + i).problem} for i in range(3)]
    cfg = TessyConfig(temperature=0, max_total_tokens=400, answer_max_tokens=8, max_retries=0)
    lt, ls = LexiconPredictor("teacher"), LexiconPredictor("student")
    pt, ps = free_port(), free_port()
    procs = [_start_server("testbed:arith-teacher", "teacher", pt), _start_server("testbed:arith-student", "student", ps)]
    try:
        tok = get_tokenizer()
        rt = RemoteBackend([f"http://127.0.0.1:{pt}"], "teacher", tokenizer=tok, timeout=60)
        rs = RemoteBackend([f"http://127.0.0.1:{ps}/v1"], "student", tokenizer=tok, timeout=60)
        out_r = str(tmp_path / "remote.jsonl")
        s_r = run_synthesis(probs, rt, rs, lt, ls, cfg, out_path=out_r)
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=20)
    out_l = str(tmp_path / "local.jsonl")
    run_synthesis(probs, LocalBackend.from_pretrained("testbed:arith-teacher"),
                  LocalBackend.from_pretrained("testbed:arith-student"), lt, ls, cfg, out_path=out_l)
    rr, rl = latest_records(out_r), latest_records(out_l)
    assert s_r["records"] == 3
    for i in rr:
        assert rr[i]["status"] == rl[i]["status"]
        if rr[i]["status"] == "ok":
            assert rr[i]["completion"] == rl[i]["completion"]
            assert [x["source"] for x in rr[i]["spans"]] == [x["source"] for x in rl[i]["spans"]]
