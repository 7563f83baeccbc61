"""``scrimp tip distill``: on-policy distillation with TIP token selection from the command line.

    scrimp tip distill --student /ckpt/Qwen3-0.6B --teacher /ckpt/Qwen3-8B --prompts prompts.jsonl \\
        --out runs/tip --steps 200 --rule soft_or --ratio 0.5 --device cuda --dtype bfloat16
    torchrun --nproc_per_node 8 -m scrimp.cli tip distill ... [--fsdp]

Prompts: one JSON object per line, ``{"prompt": str}`` or ``{"messages": [...]}``, rendered with the
student's chat template (:mod:`scrimp.tip.prompts`). Without ``--prompts`` the testbed pair distils on
the testbed ``arith`` task (``--eval-n`` then reports its accuracy before and after).
``--out DIR`` gets ``checkpoint-N/`` (a Hugging Face checkpoint of the student + tokenizer +
training state) every ``--checkpoint-every`` steps and at the end, and ``metrics.jsonl``; rerunning
the same command resumes from the newest checkpoint (``--no-resume`` starts over).
"""
from __future__ import annotations

import os
import sys

from ..cli import add_common_arguments, register_command, write_json
from ..models import add_model_arguments
from .select import RULES

DEFAULT_STUDENT = "testbed:arith-student-teacher-style"
DEFAULT_TEACHER = "testbed:arith-teacher"


def _build_distill(p):
    add_model_arguments(p, "--student", default=DEFAULT_STUDENT)
    add_model_arguments(p, "--teacher", default=DEFAULT_TEACHER, device_dtype=False)
    p.add_argument("--prompts", metavar="FILE.jsonl", default=None,
                   help='prompts, one {"prompt": str} or {"messages": [...]} per line (default: the testbed '
                        "arith task)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output directory: checkpoint-N/ (Hugging Face checkpoint + training state) and "
                        "metrics.jsonl; rerunning resumes from it (default: no checkpoints)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps in total, resumed ones included (default 20)")
    p.add_argument("--rule", default="soft_or", choices=RULES, help="token selection rule (default soft_or)")
    p.add_argument("--ratio", type=float, default=0.5, help="kept fraction of response tokens, in (0, 1] (default 0.5)")
    p.add_argument("--kind", default="reverse", choices=("reverse", "forward", "jsd"),
                   help="divergence on the kept tokens (default reverse KL, as the paper)")
    p.add_argument("--beta", type=float, default=0.5, help="JSD interpolation weight for --kind jsd (default 0.5)")
    p.add_argument("--batch-size", type=int, default=8, help="rollouts per micro-batch, per process (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="rollout sampling temperature; 0 = greedy (default 1.0: the student's own distribution)")
    p.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="rollout top-k sampling (default 0: off)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="rollout length limit in tokens (default 64)")
    p.add_argument("--max-prompt-tokens", type=int, default=0,
                   help="refuse prompts longer than this many tokens (default 0: no limit)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1.0)")
    p.add_argument("--chunk-tokens", type=int, default=1024,
                   help="response positions whose logits are scored at a time (default 1024)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="write a checkpoint every N steps (default 0: only at the end)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the student with FSDP2 fully_shard instead of replicating it (DDP)")
    p.add_argument("--eval-n", type=int, default=0,
                   help="testbed arith only: greedy accuracy on N problems before and after (default 0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: leave as is)")
    p.add_argument("--rollouts", default="generate", choices=("generate", "vllm"),
                   help="where rollouts are sampled: generate = the student's Hugging Face generate (default); vllm = "
                        "a vllm.LLM in this process, the student's weights loaded into it every --sync-every steps")
    p.add_argument("--sync-every", type=int, default=1,
                   help="--rollouts vllm: load the student's weights into vLLM every K optimizer steps (default 1)")
    p.add_argument("--vllm-max-model-len", type=int, default=0,
                   help="--rollouts vllm: the engine's context in tokens (default 0: the student's "
                        "max_position_embeddings, at most 4096)")
    add_common_arguments(p)
    p.set_defaults(func=_run_distill)


def _device(arg: str, distributed: bool):
    import torch

    from ..models import resolve_device

    dev = resolve_device(arg)
    if distributed and dev.type == "cuda":  # one device per process
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return dev


def _run_distill(args) -> int:
    try:
        return _distill(args)
    except ValueError as e:
        print(f"scrimp tip distill: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .distiller import StepOutOfMemory
        if isinstance(e, StepOutOfMemory):
            print(f"scrimp tip distill: {e}", file=sys.stderr)
            return 1
        raise


def _distill(args) -> int:
    import torch

    from ..models import load_model
    from .distiller import OnPolicyDistiller
    from .prompts import load_prompts, prompt_source

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    if args.steps < 0:
        raise ValueError(f"--steps: expected >= 0, got {args.steps}")
    if args.eval_n and args.prompts:
        raise ValueError("--eval-n measures the testbed arith task: use it without --prompts")
    dist = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.fsdp and not dist:
        raise ValueError("--fsdp shards the student across processes: run under torchrun with more than one")
    device = _device(args.device, dist)
    if dist:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        rank = torch.distributed.get_rank() if dist else 0
        world = torch.distributed.get_world_size() if dist else 1
        # under FSDP the student is loaded on the CPU and fully_shard moves each rank's shard to the device
        student, tok = load_model(args.student, device="cpu" if args.fsdp else device, dtype=args.dtype)
        teacher, teacher_tok = load_model(args.teacher, device=device, dtype=args.dtype)
        if args.prompts:
            prompt_fn = prompt_source(load_prompts(args.prompts, tok, args.max_prompt_tokens or None),
                                      seed=args.seed, rank=rank, world=world)
        else:
            from .bench import arith_prompts
            prompt_fn = arith_prompts(tok, rank)
        report = {"student": args.student, "teacher": args.teacher, "prompts": args.prompts or "testbed arith",
                  "rule": args.rule, "ratio": args.ratio, "device": str(device), "world_size": world,
                  "parallel": ("fsdp2" if args.fsdp else "ddp") if dist else "none"}
        if args.eval_n and rank == 0:
            from .bench import arith_accuracy
            report["accuracy_before"] = arith_accuracy(student.to(device), tok, n=args.eval_n)["accuracy"]
        engine = None
        if args.rollouts == "vllm":
            if dist:
                raise ValueError("--rollouts vllm runs one engine in a single training process; not under torchrun")
            try:
                from ..integrations.vllm.rollouts import VLLMRollouts
            except ImportError as e:
                raise ValueError(f"--rollouts vllm needs vLLM installed ({e})") from None
            mml = args.vllm_max_model_len or min(4096, int(getattr(student.config, "max_position_embeddings",
                                                                   4096) or 4096))
            engine = VLLMRollouts(student, tok, max_model_len=mml, seed=args.seed)
            report["rollouts"] = {"engine": "vllm", "sync_every": args.sync_every, "max_model_len": mml}
        d = OnPolicyDistiller(
            student, teacher, tok, teacher_tokenizer=teacher_tok, rule=args.rule, ratio=args.ratio, kind=args.kind,
            beta=args.beta, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            chunk_tokens=args.chunk_tokens, grad_clip=args.grad_clip, output_dir=args.out,
            checkpoint_every=args.checkpoint_every, seed=args.seed, progress=not args.quiet, device=device,
            fsdp=args.fsdp, rollout_engine=engine, sync_every=args.sync_every)
        try:
            hist = d.train(args.steps, prompt_fn, resume=not args.no_resume)
        finally:
            if engine is not None:
                engine.close()
        if rank == 0:
            if args.eval_n:
                from .bench import arith_accuracy
                report["accuracy_after"] = arith_accuracy(d.student, tok, n=args.eval_n)["accuracy"]
            report.update({"steps": d.step_count, "checkpoint": d.last_checkpoint, "last": hist[-1] if hist else {},
                           "history": hist})
            line = {k: v for k, v in report.items() if k != "history"}
            if not args.quiet or args.json is None:
                import json
                print(json.dumps(line), flush=True)
            write_json(args.json, report)
        if dist:
            torch.distributed.barrier()
    finally:
        if dist:
            torch.distributed.destroy_process_group()
    return 0


def _build(p):
    sub = p.add_subparsers(dest="tip_command", metavar="{distill}")
    sub.required = True
    d = sub.add_parser("distill", help="on-policy distillation of a student from a teacher, TIP-selected tokens",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    _build_distill(d)


register_command("tip", "TIP token-selective on-policy distillation (distill)", _build)
