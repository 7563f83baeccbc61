"""``scrimp tessy`` verbs: train-predictor, eval-predictor, synth, stats, convert, sft-eval.

The testbed is this command's default source of models, problems and predictor training data
(``testbed_examples``); the library modules never import it."""
from __future__ import annotations

import argparse
import json
import os
import sys

from scrimp.cli import register_command


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _read_jsonl(path):
    from .output import read_records
    if not os.path.exists(path):
        raise SystemExit(f"error: no such file: {path}")
    return list(read_records(path))


def testbed_examples(n: int, style: str, seed: int = 0, tokenizer=None) -> list:
    """Ground-truth predictor training data from the testbed ``arith`` generator.

    Each example is ``{"id", "text", "spans"}``: the thinking text after ``<think>``
    (including ``</think>`` and the answer, as the classifier sees a trace) and the
    character spans of its *style* segments."""
    from scrimp.testbed import tasks
    out = []
    for i in range(n):
        ex = tasks.arith(seed=seed * 1_000_003 + i, style=style, tokenizer=tokenizer)
        text, spans, pos = "", [], 0
        for seg, lab in ex.segments:
            if pos == 0 and seg.startswith("<think>"):
                seg = seg[len("<think>"):]
            if lab == "style" and seg:
                spans.append((len(text), len(text) + len(seg)))
            text += seg
            pos += 1
        out.append({"id": f"arith-{style}-{seed}-{i}", "text": text, "spans": spans})
    return out


testbed_examples.__test__ = False  # not a pytest test despite its name


def testbed_tokenizer():
    from scrimp.testbed import get_tokenizer
    return get_tokenizer()


def _progress(args) -> bool:
    quiet = getattr(args, "no_progress", False) or getattr(args, "quiet", False)
    if quiet:
        from scrimp.cli import quiet_libraries
        quiet_libraries()
    return not quiet


# ----------------------------------------------------------------------------- predictors

def _train_predictor(args) -> int:
    from scrimp.cli import write_json
    from .predictor import BoundaryPredictor, evaluate_predictor, train_predictor
    import torch
    torch.set_num_threads(args.threads)
    style = args.style or args.role
    if args.source == "testbed":
        examples = testbed_examples(args.n, style, seed=args.seed)
        if args.mix:
            other = "student" if style == "teacher" else "teacher"
            examples += testbed_examples(args.n // 2, other, seed=args.seed + 7)
    elif args.source == "annotations":
        if not args.data:
            raise SystemExit("error: --source annotations needs --data FILE (JSONL of {text, spans})")
        examples = []
        for r in _read_jsonl(args.data):
            spans = r.get("spans")
            if spans is None and "pred_result" in r:  # the official annotator's format
                spans = [(s["start"], s["end"]) for s in (r["pred_result"] or [])]
            text = r.get("text", r.get("think_text"))
            if isinstance(text, str) and spans is not None:
                examples.append({"text": text, "spans": [tuple(s) for s in spans]})
    else:  # annotate traces with an LLM first
        from .annotate import EndpointAnnotator, annotate_texts
        if not (args.data and args.annotator_url and args.annotator_model):
            raise SystemExit("error: --source annotate needs --data TRACES.jsonl, --annotator-url and --annotator-model")
        texts = []
        for r in _read_jsonl(args.data):
            t = r.get("thinking") or r.get("text") or r.get("completion") or ""
            t = t.split("</think>")[0].replace("<think>", "")
            if t.strip():
                texts.append(t)
        ann = EndpointAnnotator(args.annotator_url, args.annotator_model, api=args.annotator_api)
        examples, rep = annotate_texts(ann, texts, words=args.chunk_words, strict=not args.lenient)
        _log(f"annotation: {json.dumps(rep)}")
        if args.save_annotations:
            with open(args.save_annotations, "w") as f:
                for e in examples:
                    f.write(json.dumps(e) + "\n")
    if not examples:
        raise SystemExit("error: no usable training examples")
    progress = _progress(args)
    try:
        tok = None
        if args.tokenizer:
            from scrimp.models import load_tokenizer
            tok = load_tokenizer(args.tokenizer)
        elif not args.init_from:
            tok = testbed_tokenizer()
        pred = BoundaryPredictor.new(args.role, tokenizer=tok, hidden=args.hidden, layers=args.layers,
                                     init_from=args.init_from, max_length=args.max_length, seed=args.seed,
                                     device=args.device)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    _log(f"training {pred.describe()} on {len(examples)} examples ({pred.device})")
    m = train_predictor(pred, examples, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, progress=progress, log=_log)
    held = testbed_examples(args.eval_n, style, seed=args.seed + 1000)
    ev = evaluate_predictor(pred, held)
    pred.save_pretrained(args.out, extra={"train": m, "source": args.source, "heldout_testbed": ev})
    rep = {"out": args.out, "train": m, "heldout": ev}
    print(json.dumps(rep, indent=2))
    write_json(args.json, rep)
    return 0


def _eval_predictor(args) -> int:
    from .predictor import evaluate_predictor, load_predictor
    try:
        pred = load_predictor(args.predictor, args.role, tokenizer=testbed_tokenizer() if args.predictor == "lexicon"
                              else None, device=args.device)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    rows = []
    for style in args.styles:
        ev = evaluate_predictor(pred, testbed_examples(args.n, style, seed=args.seed))
        ev["text_style"] = style
        rows.append(ev)
        print(f"{pred.describe():<55} {style:<8} P={ev['precision']:.3f} R={ev['recall']:.3f} "
              f"F1={ev['f1']:.3f} acc={ev['accuracy']:.3f} first-boundary={ev['first_boundary_agreement']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


# ----------------------------------------------------------------------------- synthesis

def load_problems(args):
    """Problems from --input (JSONL: prompt or messages, id?, reference?/answer?) or --testbed-arith N."""
    if args.input:
        from .synth import read_problems
        if not os.path.exists(args.input):
            raise SystemExit(f"error: no such file: {args.input}")
        try:
            return read_problems(args.input)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    from scrimp.testbed import tasks
    out = []
    for i in range(args.testbed_arith):
        ex = tasks.arith(seed=args.seed * 1_000_003 + i)
        out.append({"id": f"arith-{args.seed}-{i}", "prompt": ex.problem, "reference": ex.answer})
    return out


def make_backends(args):
    """(teacher, student) backends from --teacher/--student (local) or --*-url (remote)."""
    from scrimp.models import load_tokenizer
    from .backends import LocalBackend, RemoteBackend
    out = []
    for role in ("teacher", "student"):
        urls = getattr(args, f"{role}_url") or []
        model = getattr(args, role)
        if urls:
            tok = None
            tspec = getattr(args, f"{role}_tokenizer") or model
            if tspec:
                tok = load_tokenizer(tspec)
            name = getattr(args, f"{role}_model_name") or model or role
            out.append(RemoteBackend(urls, name, tokenizer=tok, concurrency=args.remote_concurrency,
                                     timeout=args.timeout, retries=args.retries, name=name,
                                     max_model_len=getattr(args, f"{role}_max_model_len")))
        else:
            if not model:
                raise SystemExit(f"error: give --{role} SPEC (local) or --{role}-url URL (remote)")
            out.append(LocalBackend.from_pretrained(model, name=model, max_batch=args.max_batch, device=args.device,
                                                    dtype=args.dtype, decoding=args.decoding))
    return out


def check_remote(backends) -> None:
    """Read each remote model's endpoints once before the run: SystemExit when none of a model's endpoints
    answers or serves its name; a note for each endpoint that does not (the run avoids it and retries it)."""
    import asyncio
    from .backends import RemoteBackend

    async def go():
        from .backends import BackendError, GenParams
        res = []
        for b in backends:
            if isinstance(b, RemoteBackend):
                try:
                    errs = await b.check()
                    for i, (ep, e) in enumerate(zip(b.endpoints, errs)):  # a broken engine shows at once
                        if e is None:
                            one = RemoteBackend([ep.url], b.model_name, tokenizer=b.tokenizer, timeout=b.timeout,
                                                retries=0, name=b.name, max_model_len=b.max_model_len)
                            try:
                                await one.generate("a", 1, GenParams(0.0, 1.0, 0))
                            except BackendError as x:
                                errs[i] = f"a 1-token completion failed: {x}"
                            finally:
                                await one.aclose()
                    res.append((b, errs))
                finally:
                    await b.aclose()
        return res
    roles = {id(b): r for b, r in zip(backends, ("teacher", "student"))}
    for b, errs in asyncio.run(go()):
        bad = [(ep.url, e) for ep, e in zip(b.endpoints, errs) if e is not None]
        if len(bad) == len(errs):
            role = roles.get(id(b), "student")
            hint = ""
            if any("1-token completion" in e for _, e in bad):
                hint = (f" (the server's log gives the engine's reason; a model the server cannot run, such as one "
                        f"with attention heads vLLM's CPU backend refuses, runs in process: --{role} SPEC without "
                        f"--{role}-url)")
            raise SystemExit(f"error: no endpoint of {b.name!r} is usable: " + "; ".join(e for _, e in bad) + hint)
        for url, e in bad:
            _log(f"warning: {url}: {e}")
        for ep in b.endpoints:
            if ep.probed:
                lim = b.context_limit(ep)
                _log(f"{b.name} at {ep.base}: context {lim if lim else 'not reported'} tokens")


def _synth(args) -> int:
    import asyncio
    import torch
    from .output import format_stats, stats
    from .predictor import load_predictor
    from .synth import TessyConfig, parse_shard, synthesize
    torch.set_num_threads(args.threads)
    if not args.input and not args.testbed_arith:
        raise SystemExit("error: give --input FILE or --testbed-arith N")
    try:
        shard = parse_shard(args.shard)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
                if v is not None}
    cfg = TessyConfig.with_sampling(args.sampling, teacher_step=args.teacher_step, student_step=args.student_step,
                      max_total_tokens=args.max_tokens, answer_max_tokens=args.answer_max_tokens,
                      max_retries=args.max_retries, concurrency=args.concurrency, extend=args.extend,
                      think_open=args.think_open, think_close=args.think_close,
                      teacher_think_open=args.teacher_think_open, teacher_think_close=args.teacher_think_close,
                      student_think_open=args.student_think_open, student_think_close=args.student_think_close,
                      min_span_tokens=args.min_span_tokens, **sampling)
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    probs = load_problems(args)
    progress = _progress(args)
    try:
        teacher, student = make_backends(args)
        check_remote([teacher, student])
        tp = load_predictor(args.teacher_predictor, "teacher", device=args.device)
        sp = load_predictor(args.student_predictor, "student", device=args.device)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}")
    try:
        summary = asyncio.run(synthesize(probs, teacher, student, tp, sp, cfg, out_path=args.out, shard=shard,
                                         retry_failed=args.retry_failed, progress=progress,
                                         teacher_template=args.teacher_template,
                                         student_template=args.student_template))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    _log(json.dumps({k: v for k, v in summary.items()}, default=str))
    st = stats(args.out)
    print(format_stats(st))
    from scrimp.cli import write_json
    write_json(args.json, {"command": "scrimp tessy synth", "summary": summary, "stats": st,
                           "backends": {"teacher": teacher.describe(), "student": student.describe()}})
    return 0


def _stats(args) -> int:
    from scrimp.cli import write_json
    from .output import format_stats, stats
    if not os.path.exists(args.file):
        raise SystemExit(f"error: no such file: {args.file}")
    s = stats(args.file)
    print(json.dumps(s, indent=2) if args.json == "-" else format_stats(s))
    if args.json not in (None, "-"):
        write_json(args.json, s)
    return 0


def _convert(args) -> int:
    from .output import write_chat
    if not os.path.exists(args.file):
        raise SystemExit(f"error: no such file: {args.file}")
    try:
        n = write_chat(args.file, args.out, fmt=args.format, only_ok=not args.include_failed, system=args.system)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {n} chat records to {args.out} ({args.format})")
    return 0


def _sft_eval(args) -> int:
    import torch
    from scrimp import testbed
    from scrimp.cli import write_json
    from scrimp.models import load_model
    from .output import latest_records
    from .sft import sft
    torch.set_num_threads(args.threads)
    if not os.path.exists(args.file):
        raise SystemExit(f"error: no such file: {args.file}")
    recs = [r for r in latest_records(args.file).values()
            if r.get("status") == "ok" and isinstance(r.get("completion"), str)]
    if not recs:
        raise SystemExit(f"error: {args.file} has no complete traces")
    try:
        model, tok = load_model(args.student, device=args.device, dtype=args.dtype)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    base = testbed.evaluate(model, tok, "arith", n=args.eval_n, seed=args.eval_seed)["accuracy"]
    try:
        tuned, m = sft(model, tok, recs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       log=_log, trainer=args.trainer, progress=_progress(args))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    acc = testbed.evaluate(tuned, tok, "arith", n=args.eval_n, seed=args.eval_seed)["accuracy"]
    if args.save:
        tuned.save_pretrained(args.save)
        tok.save_pretrained(args.save)
    rep = {"records": len(recs), "base_accuracy": base, "sft_accuracy": acc, "sft": m}
    print(json.dumps(rep, indent=2))
    write_json(args.json, rep)
    return 0


def _build(p: argparse.ArgumentParser) -> None:
    from scrimp.models import add_device_dtype_arguments, add_model_arguments
    from .backends import DECODING_MODES
    from .sft import SFT_TRAINERS
    from .synth import SAMPLING_PRESETS
    sub = p.add_subparsers(dest="tessy_command", metavar="{train-predictor,eval-predictor,synth,stats,convert,sft-eval}")
    sub.required = True

    def quiet(q):
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    t = sub.add_parser("train-predictor", help="train a boundary predictor (token classifier)")
    t.add_argument("--role", required=True, choices=["teacher", "student"],
                   help="teacher: reads teacher text, fires before style; student: fires before capability")
    t.add_argument("--source", default="testbed", choices=["testbed", "annotations", "annotate"],
                   help="testbed: ground-truth labels of the arith generator; annotations: JSONL {text, spans} "
                        "(or the official {think_text, pred_result}); annotate: label --data traces with an LLM")
    t.add_argument("--data", help="annotations (source annotations) or traces JSONL (source annotate)")
    t.add_argument("--annotator-url", help="OpenAI-compatible base URL of the annotator")
    t.add_argument("--annotator-model", help="model name at the annotator endpoint")
    t.add_argument("--annotator-api", default="chat", choices=["chat", "completions"],
                   help="annotator endpoint API (default chat)")
    t.add_argument("--chunk-words", type=int, default=60, help="words per annotated chunk (default 60)")
    t.add_argument("--lenient", action="store_true", help="keep chunks with unlocatable phrases (drop the phrase)")
    t.add_argument("--save-annotations", help="also write the parsed annotations here")
    t.add_argument("--style", choices=["teacher", "student"], help="testbed text style (default: the role's)")
    t.add_argument("--mix", action="store_true", help="testbed: add traces of the other style")
    t.add_argument("--n", type=int, default=400, help="testbed training traces")
    t.add_argument("--eval-n", type=int, default=100, help="held-out testbed traces for P/R")
    t.add_argument("--out", required=True, help="directory to save the trained predictor in")
    t.add_argument("--init-from", help="initialise the backbone from this causal LM (testbed:NAME, directory, hub id)")
    t.add_argument("--tokenizer", help="tokenizer of the classifier (a model spec; default: --init-from's, else "
                                       "the testbed tokenizer)")
    t.add_argument("--hidden", type=int, default=64, help="hidden size of a fresh classifier")
    t.add_argument("--layers", type=int, default=2, help="layers of a fresh classifier")
    t.add_argument("--max-length", type=int, default=200, help="tokens the classifier sees at inference")
    t.add_argument("--epochs", type=float, default=3.0, help="training epochs")
    t.add_argument("--batch-size", type=int, default=32, help="training batch size")
    t.add_argument("--lr", type=float, default=2e-3, help="learning rate (AdamW, warmup + cosine)")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    t.add_argument("--json", metavar="PATH", help="also write the report to this JSON file")
    add_device_dtype_arguments(t)
    quiet(t)
    t.set_defaults(func=_train_predictor)

    e = sub.add_parser("eval-predictor", help="precision/recall of a predictor on held-out testbed traces")
    e.add_argument("predictor", help="predictor directory or 'lexicon'")
    e.add_argument("--role", required=True, choices=["teacher", "student"], help="the predictor's role")
    e.add_argument("--styles", nargs="+", default=["teacher", "student"], choices=["teacher", "student"],
                   help="testbed text styles to evaluate on")
    e.add_argument("--n", type=int, default=200, help="held-out traces per style")
    e.add_argument("--seed", type=int, default=12345, help="seed of the held-out traces")
    e.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    e.add_argument("--device", default="auto", help="where the classifier runs: auto, cpu, cuda, cuda:N")
    e.set_defaults(func=_eval_predictor)

    s = sub.add_parser("synth", help="synthesize TESSY traces into a JSONL file")
    s.add_argument("--input", help="JSONL of problems: prompt (or messages), id, reference")
    s.add_argument("--testbed-arith", type=int, default=0, help="use N testbed arith problems instead")
    s.add_argument("--seed", type=int, default=0, help="seed of the testbed problems")
    s.add_argument("--out", required=True, help="output JSONL (appended to; finished ids are skipped)")
    add_model_arguments(s, "--teacher", default="testbed:arith-teacher", device_dtype=False)
    add_model_arguments(s, "--student", default="testbed:arith-student")
    s.add_argument("--decoding", default="incremental", choices=list(DECODING_MODES),
                   help="local backend: incremental (each problem keeps its KV cache across spans, only new "
                        "tokens are prefilled) or reprefill (the whole trace at every span)")
    s.add_argument("--teacher-url", action="append", help="remote endpoint (repeat for several)")
    s.add_argument("--student-url", action="append", help="remote endpoint (repeat for several)")
    s.add_argument("--teacher-model-name", help="model name sent to the teacher endpoints")
    s.add_argument("--student-model-name", help="model name sent to the student endpoints")
    s.add_argument("--teacher-tokenizer", help="tokenizer spec (chat template, token counts) for a remote teacher")
    s.add_argument("--student-tokenizer", help="tokenizer spec (chat template, token counts) for a remote student")
    s.add_argument("--teacher-template", help="prompt template with {prompt} instead of the chat template")
    s.add_argument("--student-template", help="prompt template with {prompt} instead of the chat template")
    s.add_argument("--teacher-predictor", default="lexicon", help="predictor directory or 'lexicon'")
    s.add_argument("--student-predictor", default="lexicon", help="predictor directory or 'lexicon'")
    s.add_argument("--teacher-step", type=int, default=20, help="tokens per teacher span (paper 20, code 10)")
    s.add_argument("--student-step", type=int, default=20, help="tokens per student span (paper 20, code 5)")
    s.add_argument("--max-tokens", type=int, default=38000, help="abort a trace at this many tokens (prompt included)")
    s.add_argument("--answer-max-tokens", type=int, default=1024, help="token budget of the final answer")
    s.add_argument("--max-retries", type=int, default=5, help="retries of a failed problem")
    s.add_argument("--min-span-tokens", type=int, default=1, help="tokens before a span may end")
    s.add_argument("--extend", default="word", choices=["word", "code", "none"],
                   help="cut extension: word (paper), code (official code), none")
    s.add_argument("--think-open", default="<think>", help="opening think marker of both models")
    s.add_argument("--think-close", default="</think>", help="closing think marker of both models")
    for role in ("teacher", "student"):
        s.add_argument(f"--{role}-think-open", default=None,
                       help=f"the {role}'s opening think marker (default --think-open); text, any number of tokens")
        s.add_argument(f"--{role}-think-close", default=None,
                       help=f"the {role}'s closing think marker (default --think-close); text, any number of tokens")
    s.add_argument("--sampling", default="tessy", choices=sorted(SAMPLING_PRESETS),
                   help="sampling preset: tessy = the official code's temperature 0.7, top-p 0.8, top-k 20 "
                        "(default; top-k is sent to remote servers too); greedy = temperature 0. "
                        "--temperature/--top-p/--top-k override single values")
    s.add_argument("--temperature", type=float, default=None, help="sampling temperature (0: greedy; default: "
                                                                   "the --sampling preset's)")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling p (default: the preset's)")
    s.add_argument("--top-k", type=int, default=None, help="top-k sampling (0: off; default: the preset's)")
    s.add_argument("--concurrency", type=int, default=100, help="problems in flight")
    s.add_argument("--max-batch", type=int, default=64, help="local backend: largest generate batch")
    s.add_argument("--remote-concurrency", type=int, default=64, help="remote: requests in flight per model")
    for role in ("teacher", "student"):
        s.add_argument(f"--{role}-max-model-len", type=int, default=None,
                       help=f"remote {role}: context length in tokens (prompt + generated) when the endpoints do "
                            "not report it in /v1/models (vLLM does) or to stay below what they report")
    s.add_argument("--timeout", type=float, default=120.0, help="remote: seconds per request")
    s.add_argument("--retries", type=int, default=3, help="remote: retries per request")
    s.add_argument("--shard", help="i/n: process problems i, i+n, ...")
    s.add_argument("--retry-failed", action="store_true", help="redo ids whose record is a failure")
    s.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: best for small models on a shared machine)")
    s.add_argument("--json", metavar="PATH", help="also write the run summary and file statistics here")
    quiet(s)
    s.set_defaults(func=_synth)

    st = sub.add_parser("stats", help="summarise a TESSY output file")
    st.add_argument("file", help="TESSY output JSONL")
    st.add_argument("--json", default=None, metavar="PATH",
                    help="also write the statistics as JSON to PATH (- prints them as JSON instead of the table)")
    st.set_defaults(func=_stats)

    c = sub.add_parser("convert", help="TESSY file -> chat-format SFT records (JSONL or a datasets dataset)")
    c.add_argument("file", help="TESSY output JSONL")
    c.add_argument("--out", required=True, help="output JSONL file or datasets directory")
    c.add_argument("--format", default="jsonl", choices=["jsonl", "datasets"], help="output format")
    c.add_argument("--include-failed", action="store_true", help="also convert failure records (skipped: no text)")
    c.add_argument("--system", help="a system message to prepend")
    c.set_defaults(func=_convert)

    f = sub.add_parser("sft-eval", help="SFT the student on a TESSY file, report arith accuracy before/after")
    f.add_argument("file", help="TESSY output JSONL")
    add_model_arguments(f, "--student", default="testbed:arith-student")
    f.add_argument("--trainer", default="auto", choices=list(SFT_TRAINERS),
                   help="auto: TRL's SFTTrainer when TRL is installed, else scrimp's loop")
    f.add_argument("--steps", type=int, default=120, help="optimizer steps")
    f.add_argument("--batch-size", type=int, default=16, help="records per step")
    f.add_argument("--lr", type=float, default=5e-4, help="learning rate")
    f.add_argument("--eval-n", type=int, default=100, help="held-out arith problems")
    f.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out problems")
    f.add_argument("--seed", type=int, default=0, help="training seed")
    f.add_argument("--save", help="save the fine-tuned model here")
    f.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    f.add_argument("--json", metavar="PATH", help="also write the report to this JSON file")
    quiet(f)
    f.set_defaults(func=_sft_eval)


register_command("tessy", "TESSY: teacher-student cooperative synthesis of SFT data", _build)
