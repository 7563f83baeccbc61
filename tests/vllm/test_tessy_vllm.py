"""TESSY against a real vLLM OpenAI-compatible server (CPU build).

One teacher server per module: ``testbed:arith-teacher-robust`` (attention heads of 32 dims) served
with ``--max-model-len 512``; the student ``arith-student`` (heads of 16 dims, which vLLM's CPU attention
refuses) runs in process. One test serves both models: the teacher and ``arith-student-h32`` (the same
student with heads of 32). Greedy traces through vLLM equal the all-in-process run token for token.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from scrimp.cli import main  # noqa: E402
from scrimp.integrations.vllm.openai_server import VLLMServer, check_servable  # noqa: E402
from scrimp.tessy import BackendError, GenParams, RemoteBackend  # noqa: E402
from scrimp.tessy.output import latest_records, read_records  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))  # tessy_helpers
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
from tessy_helpers import needs_testbed  # noqa: E402

pytestmark = needs_testbed

TEACHER = "testbed:arith-teacher-robust"
STUDENT = "testbed:arith-student"
STUDENT_H32 = "testbed:arith-student-h32"
N_EQUAL = 32  # problems compared token for token
N_EQUAL_TWO_SERVERS = 16


@pytest.fixture(scope="module")
def teacher_server(tmp_path_factory):
    log = str(tmp_path_factory.mktemp("vllm") / "teacher.log")
    srv = VLLMServer(TEACHER, "teacher", max_model_len=512, log_path=log, startup_timeout=400, role="teacher")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def _remote_args(srv):
    return ["--teacher-url", srv.url, "--teacher-model-name", "teacher", "--teacher-tokenizer", TEACHER,
            "--student", STUDENT]


def _synth(out, extra, n, seed=0):
    return main(["tessy", "synth", "--testbed-arith", str(n), "--seed", str(seed), "--out", out, "--quiet",
                 "--threads", "1", "--device", "cpu"] + extra)


def _check_file(path):
    """Every ok record: spans concatenate to thinking + answer, provenance per span, models named."""
    recs = latest_records(path)
    for r in recs.values():
        assert r["models"]["teacher"] and r["models"]["student"]
        if r["status"] != "ok":
            assert r["finish_reason"] and r["error"]
            continue
        think = "".join(s["text"] for s in r["spans"] if s["phase"] == "think")
        assert r["thinking"] == "<think>" + think
        assert r["completion"] == r["thinking"] + "".join(s["text"] for s in r["spans"] if s["phase"] == "answer")
        assert {s["source"] for s in r["spans"]} <= {"teacher", "student"}
        assert r["n_tokens"]["total"] == sum(s["tokens"] for s in r["spans"])
    return recs


def _assert_same_traces(got, want, n):
    """Both runs wrote ``n`` records with the same status and the same spans (source, text, token count);
    returns how many are ok."""
    assert len(got) == len(want) == n
    for i in want:
        assert got[i]["status"] == want[i]["status"], i
        assert got[i]["completion"] == want[i]["completion"], i
        assert [(s["source"], s["text"], s["tokens"]) for s in got[i]["spans"]] == \
               [(s["source"], s["text"], s["tokens"]) for s in want[i]["spans"]], i
    ok = sum(r["status"] == "ok" for r in got.values())
    assert ok >= n // 2
    return ok


def test_two_vllm_servers_greedy_traces_equal_in_process(teacher_server, tmp_path):
    """Teacher and student both behind vLLM servers (the student with 32-dim heads), as TESSY's authors
    run it: the traces equal the in-process run of the same pair."""
    log = str(tmp_path / "student.log")
    student = VLLMServer(STUDENT_H32, "student", max_model_len=512, log_path=log, startup_timeout=400,
                         role="student")
    out_v, out_l = str(tmp_path / "vllm2.jsonl"), str(tmp_path / "local2.jsonl")
    try:
        student.start()
        remote = ["--teacher-url", teacher_server.url, "--teacher-model-name", "teacher",
                  "--teacher-tokenizer", TEACHER, "--student-url", student.url, "--student-model-name", "student",
                  "--student-tokenizer", STUDENT_H32, "--sampling", "greedy", "--json", str(tmp_path / "v2.json")]
        assert _synth(out_v, remote, N_EQUAL_TWO_SERVERS) == 0
    finally:
        student.stop()
    assert _synth(out_l, ["--teacher", TEACHER, "--student", STUDENT_H32, "--sampling", "greedy"],
                  N_EQUAL_TWO_SERVERS) == 0
    rv, rl = _check_file(out_v), _check_file(out_l)
    _assert_same_traces(rv, rl, N_EQUAL_TWO_SERVERS)
    assert any(s["source"] == "student" for r in rv.values() for s in r["spans"])
    rep = json.load(open(tmp_path / "v2.json"))
    for role in ("teacher", "student"):
        (ep,) = rep["backends"][role]["endpoints"]
        assert ep["max_model_len"] == 512 and ep["served"] > 0 and ep["failures"] == 0


def test_greedy_traces_through_vllm_equal_in_process(teacher_server, tmp_path):
    out_v, out_l = str(tmp_path / "vllm.jsonl"), str(tmp_path / "local.jsonl")
    t0 = time.time()
    assert _synth(out_v, _remote_args(teacher_server) + ["--sampling", "greedy", "--json", str(tmp_path / "v.json")],
                  N_EQUAL) == 0
    t_v = time.time() - t0
    t0 = time.time()
    assert _synth(out_l, ["--teacher", TEACHER, "--student", STUDENT, "--sampling", "greedy"], N_EQUAL) == 0
    t_l = time.time() - t0
    rv, rl = _check_file(out_v), _check_file(out_l)
    ok = _assert_same_traces(rv, rl, N_EQUAL)
    rep = json.load(open(tmp_path / "v.json"))
    (ep,) = rep["backends"]["teacher"]["endpoints"]
    assert ep["max_model_len"] == 512 and ep["served"] > 0 and ep["failures"] == 0
    print(f"\n{N_EQUAL} problems greedy: vLLM teacher {t_v:.1f} s, in-process teacher {t_l:.1f} s")
    # the statistics verb reads the file
    assert main(["tessy", "stats", out_v, "--json", str(tmp_path / "s.json")]) == 0
    st = json.load(open(tmp_path / "s.json"))
    assert st["records"] == N_EQUAL and st["ok"] == ok


def test_sampling_preset_through_vllm(teacher_server, tmp_path):
    """--sampling tessy (0.7 / 0.8 / top-k 20, top_k sent to vLLM): a valid file, config recorded."""
    out = str(tmp_path / "s.jsonl")
    assert _synth(out, _remote_args(teacher_server) + ["--sampling", "tessy"], 8, seed=3) == 0
    recs = _check_file(out)
    assert len(recs) == 8 and sum(r["status"] == "ok" for r in recs.values()) >= 4
    assert all(r["config"]["temperature"] == 0.7 for r in recs.values())
    rb = RemoteBackend([teacher_server.url], "teacher", retries=0)

    async def go():  # top_k reaches vLLM: top_k 1 is greedy whatever the temperature
        try:
            return [await rb.generate("<bos>user: Compute 3 + 4\nassistant: <think>", 12,
                                      GenParams(temperature=t, top_p=1.0, top_k=k)) for t, k in ((0, 0), (1.5, 1))]
        finally:
            await rb.aclose()
    import asyncio
    greedy, topk1 = asyncio.run(go())
    assert greedy.text == topk1.text


def test_resume_after_kill(teacher_server, tmp_path):
    """A synth process killed mid-run keeps its records; the rerun skips them and finishes the rest."""
    out = str(tmp_path / "r.jsonl")
    n = 48
    cmd = [sys.executable, "-c", "import sys; from scrimp.cli import main; sys.exit(main(sys.argv[1:]))",
           "tessy", "synth", "--testbed-arith", str(n), "--out", out, "--quiet", "--threads", "1", "--device", "cpu",
           "--sampling", "greedy", "--concurrency", "2"] + _remote_args(teacher_server)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        t0 = time.time()
        while time.time() - t0 < 120:
            if os.path.exists(out) and sum(1 for _ in open(out)) >= 4:
                break
            if p.poll() is not None:
                break
            time.sleep(0.05)
        killed = p.poll() is None
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    before = latest_records(out)
    assert len(before) >= 4
    if killed:
        assert len(before) < n
    assert _synth(out, _remote_args(teacher_server) + ["--sampling", "greedy"], n) == 0
    after = _check_file(out)
    assert len(after) == n
    lines = list(read_records(out))
    assert len({r["id"] for r in lines}) == len(lines)  # nothing redone, nothing lost
    for i, r in before.items():
        assert after[i] == r


def test_context_limit_of_the_real_server(teacher_server):
    """max_model_len 512 from vLLM's /v1/models bounds max_tokens; a prompt over it fails at once; a name
    the server does not serve is retried, then fails naming what it serves."""
    from scrimp.models import load_tokenizer
    tok = load_tokenizer(TEACHER)
    prompt = "<bos>user: Compute 1 + 2\nassistant: <think>"
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    import asyncio

    def gen(rb, p, k):
        async def go():
            try:
                return await rb.generate(p, k, GenParams(0.0, 1.0, 0))
            finally:
                await rb.aclose()
        return asyncio.run(go())
    rb = RemoteBackend([teacher_server.url], "teacher", tokenizer=tok, retries=0)
    r = gen(rb, prompt, 5000)  # would be refused by the server as asked
    assert rb.endpoints[0].max_model_len == 512 and rb.endpoints[0].clamped == 1
    assert r.n_tokens <= 512 - n
    rb = RemoteBackend([teacher_server.url], "teacher", retries=0)  # no tokenizer: the server's /tokenize
    gen(rb, prompt, 5000)
    assert rb.endpoints[0].tokenize is True and rb.endpoints[0].clamped == 1
    long = prompt + " 12 + 34 =" * 120
    with pytest.raises(BackendError, match="max_model_len 512: no room") as ei:
        gen(RemoteBackend([teacher_server.url], "teacher", tokenizer=tok, retries=3), long, 4)
    assert ei.value.reason == "context_length"
    with pytest.raises(BackendError, match=r"after 2 attempt.*serves \['teacher'\], not 'other'"):
        gen(RemoteBackend([teacher_server.url], "other", tokenizer=tok, retries=1, backoff=0.01), prompt, 4)
    # the server's own refusal (HTTP 400) is not retried
    j = httpx.post(teacher_server.url + "/v1/completions", json={"model": "teacher", "prompt": "x", "max_tokens": 600})
    assert j.status_code == 400
    rb = RemoteBackend([teacher_server.url], "teacher", retries=3)
    rb.endpoints[0].probed = True  # skip /v1/models: the request goes out as asked

    async def raw():
        try:
            return await rb.generate("x", 600, GenParams(0.0, 1.0, 0))
        finally:
            await rb.aclose()
    t0 = time.time()
    with pytest.raises(BackendError, match="refused .not retried.*HTTP 400.*max_model_len") as ei:
        asyncio.run(raw())
    assert ei.value.permanent and rb.endpoints[0].failures == 0 and time.time() - t0 < 5


def test_student_vllm_cannot_serve_is_refused_by_name(tmp_path):
    """arith-student has 16-dim heads: refused before starting; started anyway, vLLM comes up healthy but
    its engine dies at the first request, and the launcher reports vLLM's reason and the in-process path."""
    with pytest.raises(ValueError, match=r"attention heads have 16 dims.*head sizes 32, 64.*"
                                         r"--student SPEC` without `--student-url"):
        check_servable(STUDENT, "student")
    check_servable(TEACHER, "teacher")
    srv = VLLMServer(STUDENT, "student", max_model_len=512, check=False, role="student",
                     log_path=str(tmp_path / "student.log"), startup_timeout=400)
    with pytest.raises(RuntimeError, match=r"head_dim=16.*--student SPEC` without `--student-url"):
        srv.start()
    assert srv.proc is None  # stopped
