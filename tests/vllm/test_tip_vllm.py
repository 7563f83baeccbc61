"""TIP rollouts from a vllm.LLM colocated in the training process (VLLM_ENABLE_V1_MULTIPROCESSING=0).

Student ``testbed:arith-teacher-robust`` (attention heads of 32 dims, which vLLM's CPU attention
runs), teacher ``testbed:arith-teacher``. Greedy, weights synced every step: the rollouts of every
step equal the Hugging Face generate path's token for token, and so do the losses.
"""
import json
import os
import sys

import pytest

pytest.importorskip("vllm")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))  # tessy_helpers
from tessy_helpers import needs_testbed  # noqa: E402

pytestmark = needs_testbed

STUDENT = "testbed:arith-teacher-robust"
TEACHER = "testbed:arith-teacher"
STEPS, BATCH, NEW = 3, 4, 40


@pytest.fixture(scope="module")
def in_process_env():
    keys = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _prompts(tok):
    from scrimp.testbed import tasks

    def fn(i, b):
        return [tasks.arith(seed=1000 + i * b + j, tokenizer=tok).prompt_ids for j in range(b)]
    return fn


def _run(engine_factory):
    import scrimp
    from scrimp.tip import OnPolicyDistiller
    student, tok = scrimp.load_model(STUDENT, device="cpu", dtype="float32")
    teacher, ttok = scrimp.load_model(TEACHER, device="cpu", dtype="float32")
    engine = engine_factory(student, tok) if engine_factory else None
    d = OnPolicyDistiller(student, teacher, tok, teacher_tokenizer=ttok, rule="soft_or", ratio=0.5, lr=3e-3,
                          batch_size=BATCH, max_new_tokens=NEW, temperature=0.0, progress=False, seed=0,
                          rollout_engine=engine, sync_every=1)
    seen = []
    orig = d.rollout

    def rollout(prompts):
        ids, attn, resp = orig(prompts)
        seen.append([ids[i][resp[i]].tolist() for i in range(ids.shape[0])])
        return ids, attn, resp
    d.rollout = rollout
    hist = d.train(STEPS, _prompts(tok), resume=False)
    return d, engine, seen, hist, tok


def test_vllm_rollouts_equal_generate_with_sync_every_step(in_process_env):
    from scrimp.integrations.vllm.rollouts import VLLMRollouts
    d_ref, _, seen_ref, hist_ref, tok = _run(None)
    d, engine, seen, hist, _ = _run(lambda s, t: VLLMRollouts(s, t, max_model_len=256))
    try:
        assert engine.syncs == STEPS and d.weight_syncs == STEPS and hist[-1]["weight_syncs"] == STEPS
        assert len(seen) == len(seen_ref) == STEPS
        for step, (a, b) in enumerate(zip(seen, seen_ref)):
            assert a == b, f"step {step + 1}: vLLM rollouts differ from generate"
        for a, b in zip(hist, hist_ref):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
            assert a["response_tokens"] == b["response_tokens"]
        # the trained weights are in the engine: it answers as the trained student does, which differs
        # from the checkpoint it was started from
        import scrimp
        base, _ = scrimp.load_model(STUDENT, device="cpu", dtype="float32")
        prompts = _prompts(tok)(50, 6)
        d.sync_rollout_engine(force=True)
        got = engine.generate(prompts, NEW, 0.0, 1.0, 0, d.stop_ids)

        def hf(model):
            out = []
            for p in prompts:
                g = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=d.stop_ids,
                                   pad_token_id=d.pad_id)[0, len(p):].tolist()
                end = next((j for j, t in enumerate(g) if t in d.stop_ids), None)
                out.append(g if end is None else g[:end + 1])
            return out
        d.student.eval()
        with torch.no_grad():
            assert got == hf(d.student)
            assert got != hf(base)
    finally:
        engine.close()


def test_student_vllm_cannot_run_is_refused(in_process_env):
    import scrimp
    from scrimp.integrations.vllm.rollouts import VLLMRollouts
    student, tok = scrimp.load_model("testbed:arith-student", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=r"heads have 16 dims.*--rollouts generate"):
        VLLMRollouts(student, tok, max_model_len=256)


def test_cli_rollouts_vllm(in_process_env, tmp_path):
    from scrimp.cli import main
    rep = str(tmp_path / "r.json")
    assert main(["tip", "distill", "--student", STUDENT, "--teacher", TEACHER, "--steps", "2", "--batch-size", "2",
                 "--max-new-tokens", "16", "--temperature", "0", "--rollouts", "vllm", "--sync-every", "1",
                 "--device", "cpu", "--dtype", "float32", "--quiet", "--json", rep, "--out", str(tmp_path / "o")]) == 0
    r = json.load(open(rep))
    assert r["rollouts"]["engine"] == "vllm" and r["steps"] == 2 and r["last"]["weight_syncs"] == 2
