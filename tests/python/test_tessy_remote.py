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
        with pytest.raises(BackendError, match="refused \\(not retried\\).*HTTP 400.*bad prompt") as ei:
            gen("/e400")  # a client error is not retried
        assert ei.value.permanent and ei.value.reason == "refused"
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


# ----------------------------------------------------------------------------- server limits

def _vllm_like_app(local, name, max_model_len, tokenize=True, reply_model=None, listed=None):
    """An app that answers as vLLM does: ``/v1/models`` with ``max_model_len``, ``/tokenize``, and a
    ``/v1/completions`` that refuses (HTTP 400) a prompt + max_tokens over the context."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    app = FastAPI()
    st = {"completions": 0, "refused": 0, "max_tokens": [], "tokenize": 0}
    tok = local.tokenizer

    def count(p):
        return len(tok(p, add_special_tokens=False)["input_ids"])

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "max_model_len": max_model_len}
                                           for m in (listed or [name])]}

    if tokenize:
        @app.post("/tokenize")
        async def tokenize_(request: Request):
            st["tokenize"] += 1
            b = await request.json()
            return {"count": count(b["prompt"]), "max_model_len": max_model_len}

    @app.post("/v1/completions")
    async def completions(request: Request):
        b = await request.json()
        n, mt = count(b["prompt"]), b["max_tokens"]
        if n + mt > max_model_len:
            st["refused"] += 1
            return JSONResponse(status_code=400, content={"error": {
                "message": f"This model's maximum context length is {max_model_len} tokens. However, you "
                           f"requested {n + mt} tokens ({n} in the messages, {mt} in the completion).",
                "type": "BadRequestError", "code": 400}})
        st["completions"] += 1
        st["max_tokens"].append(mt)
        r = await local.generate(b["prompt"], mt, GenParams(b["temperature"], b["top_p"], b["top_k"]))
        return {"model": reply_model or name, "choices": [{"text": r.text, "finish_reason": r.finish_reason}],
                "usage": {"prompt_tokens": n, "completion_tokens": r.n_tokens}}
    return app, st


def _run(coro_fn):
    return asyncio.run(coro_fn())


def test_context_length_from_v1_models_bounds_max_tokens():
    """max_model_len from /v1/models: max_tokens is lowered to the room the prompt leaves (counted with the
    tokenizer, or the server's /tokenize without one); a prompt that fills the context fails at once."""
    local = _local(5)
    tok = local.tokenizer
    L = 40
    n0 = len(tok(PROMPTS[0], add_special_tokens=False)["input_ids"])
    assert n0 < L
    app, st = _vllm_like_app(local, "m", L)
    with ThreadServer(app) as srv:
        for use_tok in (True, False):
            rb = RemoteBackend([srv.url], "m", tokenizer=tok if use_tok else None, retries=0)

            async def go():
                try:
                    return await rb.generate(PROMPTS[0], 1000, GREEDY)
                finally:
                    await rb.aclose()
            r = _run(go)
            assert st["max_tokens"][-1] == L - n0 and r.n_tokens <= L - n0
            assert rb.endpoints[0].max_model_len == L and rb.endpoints[0].clamped == 1
        assert st["tokenize"] >= 1  # the run without a tokenizer counted on the server
        long_prompt = PROMPTS[0] + " 1 + 2" * 20
        rb = RemoteBackend([srv.url], "m", tokenizer=tok, retries=3, backoff=0.01)

        async def go_long():
            try:
                return await rb.generate(long_prompt, 5, GREEDY)
            finally:
                await rb.aclose()
        before = st["completions"] + st["refused"]
        with pytest.raises(BackendError, match="max_model_len 40: no room") as ei:
            _run(go_long)
        assert ei.value.permanent and ei.value.reason == "context_length"
        assert st["completions"] + st["refused"] == before  # nothing was sent
        assert st["refused"] == 0
        # a limit given by the client lowers the server's
        rb = RemoteBackend([srv.url], "m", tokenizer=tok, retries=0, max_model_len=n0 + 3)

        async def go3():
            try:
                return await rb.generate(PROMPTS[0], 50, GREEDY)
            finally:
                await rb.aclose()
        _run(go3)
        assert st["max_tokens"][-1] == 3


def test_synthesis_defaults_against_a_short_context_server(tmp_path):
    """The default config (answer budget 1024, trace limit 38000) against a server with a 96-token context:
    no request is ever refused; traces that fill the context end as context_length failures."""
    local = _local(6)
    app, st = _vllm_like_app(local, "t", 96)
    out = str(tmp_path / "short.jsonl")
    with ThreadServer(app) as srv:
        teacher = RemoteBackend([srv.url], "t", tokenizer=local.tokenizer, retries=0)
        student = ScriptBackend("S", lambda trace, k: " Okay so")
        summ = run_synthesis(["Compute 1 + 2", "Compute 3 + 4"], teacher, student, LexiconPredictor("teacher"),
                             LexiconPredictor("student"), TessyConfig(temperature=0, max_retries=1,
                                                                      first="teacher"), out_path=out)
    assert st["refused"] == 0 and st["completions"] >= 2
    assert max(st["max_tokens"]) <= 96
    recs = latest_records(out)
    assert len(recs) == 2 and summ["records"] == 2
    for r in recs.values():
        assert r["status"] == "ok" or r["finish_reason"] == "context_length", r
        if r["status"] != "ok":
            assert "max_model_len 96" in r["error"]


def test_refused_request_fails_the_problem_at_once(tmp_path):
    app, state = _bad_app()
    out = str(tmp_path / "refused.jsonl")
    hits = {"n": 0}

    with ThreadServer(app) as srv:
        teacher = RemoteBackend([srv.url + "/e400"], "m", retries=3, backoff=0.01)
        from scrimp.testbed import get_tokenizer
        teacher.tokenizer = get_tokenizer()

        def reply(trace, k):
            hits["n"] += 1
            return " Okay so"
        student = ScriptBackend("S", reply)
        t0 = time.time()
        summ = run_synthesis(["Compute 1 + 2"], teacher, student, LexiconPredictor("teacher"),
                             LexiconPredictor("student"), TessyConfig(max_retries=4, first="teacher"), out_path=out)
    (r,) = latest_records(out).values()
    assert r["status"] == "failed" and r["finish_reason"] == "refused" and r["attempts"] == 1
    assert "HTTP 400" in r["error"] and "bad prompt" in r["error"]
    assert summ["attempts"] == 1 and time.time() - t0 < 5


def test_wrong_model_slow_down_and_malformed_are_retried_then_fail(tmp_path):
    """Another model's name (in /v1/models or in the reply), a dead endpoint and garbage replies: retried
    with bounded backoff, then failure records with the reason; records written before are kept."""
    local = _local(7)
    tok = local.tokenizer
    app_other, _ = _vllm_like_app(local, "m", 512, listed=["other"])
    app_reply, st_reply = _vllm_like_app(local, "m", 512, reply_model="other")
    app_bad, _ = _bad_app()
    with ThreadServer(app_other) as a, ThreadServer(app_reply) as b, ThreadServer(app_bad) as c:
        def gen(url, **kw):
            rb = RemoteBackend([url], "m", tokenizer=tok, backoff=0.01, max_backoff=0.05, **kw)

            async def go():
                try:
                    return await rb.generate(PROMPTS[0], 3, GREEDY)
                finally:
                    await rb.aclose()
            return _run(go)
        t0 = time.time()
        with pytest.raises(BackendError, match=r"after 3 attempt.*serves \['other'\], not 'm'"):
            gen(a.url, retries=2)
        with pytest.raises(BackendError, match="after 3 attempt.*answered as model 'other', not 'm'"):
            gen(b.url, retries=2)
        assert st_reply["completions"] == 3
        with pytest.raises(BackendError, match="after 4 attempt.*malformed reply"):
            gen(c.url + "/garbage", retries=3)
        with pytest.raises(BackendError, match="after 2 attempt.*Timeout"):
            gen(c.url + "/slow", retries=1, timeout=0.3)
        assert time.time() - t0 < 10  # backoff bounded by max_backoff

        # a file with good records, then a run against a dead endpoint: failures appended, nothing lost
        out = str(tmp_path / "mixed.jsonl")
        good, _ = _vllm_like_app(local, "t", 512)
        with ThreadServer(good) as g:
            run_synthesis(["Compute 1 + 2"], RemoteBackend([g.url], "t", tokenizer=tok),
                          ScriptBackend("S", lambda trace, k: " Okay so </think> 3"), LexiconPredictor("teacher"),
                          LexiconPredictor("student"), TessyConfig(temperature=0, max_retries=0), out_path=out)
        first = latest_records(out)
        dead = RemoteBackend([f"http://127.0.0.1:{free_port()}"], "t", tokenizer=tok, retries=2, backoff=0.01)
        run_synthesis(["Compute 1 + 2", "Compute 5 + 6"], dead, ScriptBackend("S", lambda trace, k: " Okay so"),
                      LexiconPredictor("teacher"), LexiconPredictor("student"),
                      TessyConfig(temperature=0, max_retries=1, first="teacher"), out_path=out)
        recs = latest_records(out)
        assert len(recs) == 2
        for i, r in first.items():
            assert recs[i] == r  # the earlier record is untouched (its id skipped)
        (new,) = [r for i, r in recs.items() if i not in first]
        assert new["status"] == "failed" and "ConnectError" in new["error"] and "after 3 attempt" in new["error"]


def test_cli_refuses_when_no_endpoint_serves_the_model(tmp_path, capsys):
    from scrimp.cli import main
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit, match="no endpoint of 'teacher' is usable.*ConnectError"):
        main(["tessy", "synth", "--testbed-arith", "1", "--out", str(tmp_path / "x.jsonl"), "--teacher-url", dead,
              "--teacher-model-name", "teacher", "--teacher-tokenizer", "testbed:arith-teacher", "--retries", "0",
              "--quiet"])


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
