"""`vtprune train-rcp`: train RCP plug-ins on a JSONL of {image, question, answer} (see docs/rcp.md).

    vtprune train-rcp --model builtin:shapes-llava --data shapes/questions.jsonl --budget 64 --out rcp-64
    vtprune train-rcp --model builtin:shapes-v3-llava --split calibration --per-type 300 --budget 64 --out rcp-v3
    accelerate launch --num_processes 4 -m vtprune.commands.rcp --model DIR --data vqa.jsonl --budget 64 --out run

`add_parser(subparsers)` registers the command on an argparse subparsers object; `run(args)` executes it;
`main()` is the stand-alone entry point (`python -m vtprune.commands.rcp ...`, also under `accelerate launch`).
"""

from __future__ import annotations

import argparse
import os
import sys


def _budget(text: str) -> int | float:
    """The same rule as `vtprune.apply` (`Budget.from_text`): "64" tokens, "0.25" or "1/9" a ratio."""
    from vtprune.budget import Budget
    from vtprune.errors import BudgetError

    try:
        return Budget.from_text(text).value
    except BudgetError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _beta_lr(text: str) -> float | None:
    """A learning rate > 0, or "none" (β in the base group)."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a learning rate > 0 or 'none', got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from vtprune.commands.common import positive_int
    from vtprune.rcp.train import RCPTrainConfig

    d = RCPTrainConfig()
    p.add_argument("--model", required=True, help="builtin:NAME or a local model directory (save_pretrained)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="JSONL: one {image, question, answer} per line (docs/rcp.md)")
    src.add_argument(
        "--split",
        help="built-in benchmark v3 questions instead of --data: calibration[:SEED] (the only split RCP may be "
        "trained on; written to OUT/data)",
    )
    p.add_argument("--per-type", type=positive_int, default=300, help="with --split: questions per question type (300)")
    p.add_argument(
        "--budget",
        type=_budget,
        default=64,
        help="layer-averaged visual tokens (an int >= 1) or a ratio of N (a float in (0, 1)); default 64",
    )
    p.add_argument("--out", required=True, help="output directory (artefacts, log, resumable state)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (default: one epoch)")
    p.add_argument(
        "--batch", type=positive_int, default=d.batch, help=f"samples per process per micro-step ({d.batch})"
    )
    p.add_argument(
        "--grad-accum", type=positive_int, default=d.grad_accum, help=f"micro-steps per step ({d.grad_accum})"
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lambda-task", type=float, default=d.lambda_task, help=f"task loss weight ({d.lambda_task})")
    p.add_argument("--lambda-repair", type=float, default=d.lambda_repair, help=f"repair weight ({d.lambda_repair})")
    p.add_argument("--lambda-sparse", type=float, default=d.lambda_sparse, help=f"sparsity weight ({d.lambda_sparse})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"variance term weight in the repair loss ({d.alpha})")
    p.add_argument(
        "--repair-norm",
        default=d.repair_norm,
        choices=("teacher_std", "none"),
        help="repair loss on states divided by the teacher's per-dimension std (default) or on raw states",
    )
    p.add_argument(
        "--beta-lr",
        type=_beta_lr,
        default=d.beta_lr,
        help=f"learning rate of the pruners' logit offsets β ({d.beta_lr}); 'none': the base lr, one group (the spec)",
    )
    p.add_argument("--d-prime", type=positive_int, default=None, help="pruner width d' (default: 512·d/4096)")
    p.add_argument("--bottleneck", type=positive_int, default=None, help="DRA bottleneck b (default: 512·d/4096)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on GPU, fp32 on CPU"
    )
    p.add_argument("--max-length", type=positive_int, default=d.max_length)
    p.add_argument(
        "--suffix",
        default=None,
        help="text appended to every question (default: the spec's VQAv2 suffix when the model has a "
        "chat template, else nothing)",
    )
    p.add_argument("--save-every", type=positive_int, default=d.save_every, help="checkpoint every N steps")
    p.add_argument("--calib-data", default=None, help="JSONL for the δ calibration (default: hold out of --data)")
    p.add_argument("--calib-n", type=int, default=d.calib_n, help="calibration samples (0: no calibration)")
    p.add_argument("--save-dtype", default=d.save_dtype, choices=("fp32", "fp16", "bf16"))
    p.add_argument("--time-limit", type=float, default=None, help="stop (resumable) after this many seconds")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="require a state in OUT/state to continue from")
    g.add_argument("--fresh", action="store_true", help="ignore an existing OUT/state and start over")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train-rcp` on a subparsers object whose parser class is `vtprune.cli.Parser`: the arguments (their
    defaults come from the trainer's config) are added when the command is first used, not at `vtprune --help`."""
    from vtprune.commands.common import add_lazy_parser

    p = add_lazy_parser(
        subparsers,
        "train-rcp",
        add_arguments,
        help="train RCP plug-ins (pruner + repair adapters) on a frozen LVLM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from vtprune.commands.common import check_model, check_path

    check_model(args.model)
    check_path(args.data, "data file", "file")
    check_path(args.calib_data, "calibration data file", "file")
    import torch

    data = args.data
    if args.split:
        from pathlib import Path

        from vtprune.rcp.testbed_data import calibration_jsonl
        from vtprune.testbed.splits import parse_split

        data = calibration_jsonl(parse_split(args.split), Path(args.out) / "data", args.per_type)

    from vtprune.rcp.train import RCPTrainConfig, train
    from vtprune.tables import to_json

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RCPTrainConfig(
        budget=args.budget,
        steps=args.steps,
        batch=args.batch,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        lambda_task=args.lambda_task,
        lambda_repair=args.lambda_repair,
        lambda_sparse=args.lambda_sparse,
        alpha=args.alpha,
        repair_norm=args.repair_norm,
        beta_lr=args.beta_lr,
        d_prime=args.d_prime,
        bottleneck=args.bottleneck,
        precision=args.precision,
        max_length=args.max_length,
        suffix=args.suffix,
        save_every=args.save_every,
        calib_data=args.calib_data,
        calib_n=args.calib_n,
        save_dtype=args.save_dtype,
        time_limit=args.time_limit,
    )
    resume = "require" if args.resume else "never" if args.fresh else "auto"
    summary = train(args.model, data, args.out, cfg, device=args.device, resume=resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(to_json(summary), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point; user errors as one line and exit status 2, like `vtprune`."""
    from vtprune.commands.common import Parser, guarded, split_debug

    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    parser = Parser(
        prog="vtprune train-rcp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        populate=add_arguments,
    )
    return guarded(lambda: run(parser.parse_args(argv)), "vtprune train-rcp", debug)


if __name__ == "__main__":
    raise SystemExit(main())
