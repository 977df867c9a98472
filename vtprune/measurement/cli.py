"""`vtprune bench`: the argument parser; the logic is in `vtprune.measurement.bench`."""

from __future__ import annotations

import argparse


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _budgets(text: str) -> list[int | float]:
    return [int(t) if t.isdigit() else float(t) for t in _list(text)]


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep:
        raise argparse.ArgumentTypeError(f"--image-size expects WxH, got {text!r}")
    return int(w), int(h)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `bench` sub-command; returns its parser (with `func` set)."""
    p = subparsers.add_parser(
        "bench",
        help="prefill/decode/selection time, memory, KV bytes and FLOPs of methods × budgets vs no pruning",
        description="Time methods × budgets against the unpruned model on random inputs (interleaved rounds).",
    )
    p.add_argument(
        "--model", required=True, help="arch:NAME (random weights, real sizes), tiny:KIND, builtin:NAME or a directory"
    )
    p.add_argument("--method", default="pool", help="comma-separated methods (no pruning is always included)")
    p.add_argument("--budget", default="64", help="comma-separated budgets: tokens (int) or ratios (float)")
    p.add_argument("--budget-mode", default="layer_avg", choices=["layer_avg", "retained"])
    p.add_argument("--option", action="append", help="method option KEY=VALUE (repeatable)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per call (>= 1)")
    p.add_argument("--image-size", type=_size, default=None, help="WxH in px (Qwen2.5-VL, LLaVA-NeXT)")
    p.add_argument("--text-tokens", type=int, default=64, help="random text tokens around the image")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write one row per (method, budget) here")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json

    import torch
    from rich.console import Console

    from vtprune.cli import _parse_options
    from vtprune.measurement.bench import BenchConfig, bench_table, run_bench

    if args.new_tokens < 1:
        raise SystemExit("--new-tokens must be >= 1")
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        model=args.model,
        methods=_list(args.method),
        budgets=_budgets(args.budget),
        batch=args.batch,
        dtype=args.dtype,
        attn=args.attn,
        device=args.device,
        layers=args.layers,
        repeats=args.repeats,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        image_size=args.image_size,
        text_tokens=args.text_tokens,
        budget_mode=args.budget_mode,
        options=_parse_options(args.option),
    )
    result = run_bench(cfg, progress=True)
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)
    console.print(bench_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0
