"""`scrimp tessy ...` commands and the demo section."""
import json
import os

import pytest

from scrimp.cli import main
from scrimp.tessy import latest_records

from tessy_helpers import needs_testbed, tiny_causal_lm


def test_train_and_eval_predictor_cli(tmp_path, capsys):
    out = str(tmp_path / "bs")
    assert main(["tessy", "train-predictor", "--role", "student", "--n", "96", "--eval-n", "20", "--epochs", "1",
                 "--hidden", "32", "--layers", "1", "--out", out, "--quiet", "--threads", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["train"]["steps"] == 3 and 0 <= rep["heldout"]["precision"] <= 1
    meta = json.load(open(os.path.join(out, "tessy_predictor.json")))
    assert meta["role"] == "student" and meta["source"] == "testbed"
    assert main(["tessy", "eval-predictor", "lexicon", "--role", "teacher", "--n", "20",
                 "--json", str(tmp_path / "ev.json")]) == 0
    rows = json.load(open(tmp_path / "ev.json"))
    assert [r["text_style"] for r in rows] == ["teacher", "student"] and rows[0]["precision"] > 0.9
    # annotations in the official format
    ann = tmp_path / "ann.jsonl"
    ann.write_text(json.dumps({"think_text": "Okay so 1 + 2 = 3.", "pred_result": [{"start": 0, "end": 8}]}) + "\n")
    assert main(["tessy", "train-predictor", "--role", "teacher", "--source", "annotations", "--data", str(ann),
                 "--epochs", "1", "--hidden", "32", "--layers", "1", "--eval-n", "5", "--out",
                 str(tmp_path / "bt"), "--quiet", "--threads", "1"]) == 0
    with pytest.raises(SystemExit, match="needs --data"):
        main(["tessy", "train-predictor", "--role", "teacher", "--source", "annotations", "--out", str(tmp_path / "x")])


def test_synth_cli_failures_stats_convert(tmp_path, capsys):
    """Random-weight models never close their thinking: every problem ends as a
    `length` failure record, the run completes, stats and convert still work."""
    model, tok = tiny_causal_lm(seed=5)
    d = str(tmp_path / "tiny")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    probs = tmp_path / "p.jsonl"
    probs.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Compute {i} + 1", "answer": str(i + 1)}) + "\n"
                             for i in range(3)))
    out = str(tmp_path / "o.jsonl")
    args = ["tessy", "synth", "--input", str(probs), "--out", out, "--teacher", d, "--student", d,
            "--max-tokens", "40", "--max-retries", "0", "--quiet", "--threads", "1"]
    assert main(args) == 0
    recs = latest_records(out)
    assert set(recs) == {"q0", "q1", "q2"} and all(r["finish_reason"] == "length" for r in recs.values())
    assert recs["q1"]["reference"] == "2"
    capsys.readouterr()
    assert main(["tessy", "stats", out, "--json", "-"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["failed"] == 3 and s["finish_reasons"] == {"length": 3}
    assert main(["tessy", "convert", out, "--out", str(tmp_path / "c.jsonl")]) == 0
    assert open(tmp_path / "c.jsonl").read() == ""
    assert main(args) == 0  # rerun: everything skipped
    assert len(open(out).read().splitlines()) == 3
    with pytest.raises(SystemExit, match="shard"):
        main(args[:-2] + ["--shard", "3/2"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["tessy", "stats", str(tmp_path / "missing.jsonl")])


@needs_testbed
def test_synth_cli_testbed_and_demo(tmp_path, capsys):
    out = str(tmp_path / "tb.jsonl")
    assert main(["tessy", "synth", "--testbed-arith", "4", "--out", out, "--temperature", "0",
                 "--max-tokens", "400", "--answer-max-tokens", "8", "--quiet", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "student share" in text
    assert len(latest_records(out)) == 4
    from scrimp.tessy import demo_section
    rep = demo_section(quick=True)
    assert "student token share" in rep and "problems/min" in rep


@needs_testbed
def test_sft_eval_cli(tmp_path, capsys):
    from scrimp.tessy import LexiconPredictor, TessyConfig, run_synthesis
    from tessy_helpers import ScriptBackend
    from test_tessy_synth import _student_reply, _teacher_reply
    out = str(tmp_path / "s.jsonl")
    run_synthesis(["Compute 1 + 2"], ScriptBackend("T", _teacher_reply), ScriptBackend("S", _student_reply),
                  LexiconPredictor("teacher"), LexiconPredictor("student"), TessyConfig(), out_path=out)
    capsys.readouterr()
    assert main(["tessy", "sft-eval", out, "--steps", "3", "--batch-size", "2", "--eval-n", "3", "--threads", "1",
                 "--save", str(tmp_path / "m")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["records"] == 1 and rep["sft"]["steps"] == 3 and 0 <= rep["sft_accuracy"] <= 1
    assert os.path.isfile(tmp_path / "m" / "config.json")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no complete traces"):
        main(["tessy", "sft-eval", str(empty)])
