"""``scrimp distill``: on-policy distillation with TIP token selection from the command line.

    scrimp distill --student arith-student-teacher-style --teacher arith-teacher --rule soft_or --ratio 0.5 \\
        --steps 30 --batch-size 8 --output-dir runs/soft_or50 --eval-n 50

``--student`` / ``--teacher`` are testbed names or Hugging Face checkpoint directories (sharing a
vocabulary). ``--output-dir`` gets ``checkpoint.pt`` and ``metrics.jsonl``; rerunning the same command
resumes from the checkpoint (``--no-resume`` starts over). Works under ``torchrun`` (DDP; gloo on CPU).
"""
from __future__ import annotations

import json
import os
import sys

from ..cli import register_command
from .select import RULES


def _load(name_or_path: str):
    from .. import testbed

    if name_or_path in testbed.MODELS:
        return testbed.load(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(name_or_path):
        raise SystemExit(f"scrimp distill: {name_or_path!r} is neither a testbed model "
                         f"({', '.join(testbed.MODELS)}) nor a checkpoint directory")
    return AutoModelForCausalLM.from_pretrained(name_or_path), AutoTokenizer.from_pretrained(name_or_path)


def _build(p):
    p.add_argument("--student", required=True, help="testbed name or HF checkpoint directory")
    p.add_argument("--teacher", required=True, help="testbed name or HF checkpoint directory")
    p.add_argument("--rule", default="soft_or", choices=RULES)
    p.add_argument("--ratio", type=float, default=0.5, help="kept fraction rho in (0, 1]")
    p.add_argument("--kind", default="reverse", choices=("reverse", "forward", "jsd"))
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="rollouts per step (per rank)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--eval-n", type=int, default=0, help="arith accuracy of the student before/after (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    from .distiller import OnPolicyDistiller, arith_accuracy, arith_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    dist = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if dist:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    student, tok = _load(args.student)
    teacher, _ = _load(args.teacher)
    rank = torch.distributed.get_rank() if dist else 0
    report = {}
    if args.eval_n and rank == 0:
        report["accuracy_before"] = arith_accuracy(student.to(device), tok, n=args.eval_n)["accuracy"]
    d = OnPolicyDistiller(student, teacher, tok, rule=args.rule, ratio=args.ratio, kind=args.kind, beta=args.beta,
                          lr=args.lr, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          output_dir=args.output_dir, checkpoint_every=args.checkpoint_every, seed=args.seed,
                          progress=not args.no_progress, device=device)
    hist = d.train(args.steps, arith_prompts(tok, rank), resume=not args.no_resume)
    if rank == 0:
        if args.eval_n:
            report["accuracy_after"] = arith_accuracy(d.student, tok, n=args.eval_n)["accuracy"]
        last = hist[-1] if hist else {}
        report.update({"steps": d.step_count, "last": last})
        print(json.dumps(report), file=sys.stdout, flush=True)
    if dist:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


register_command("distill", "on-policy distillation with TIP token selection", _build)
