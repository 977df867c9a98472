"""`vtprune bench`: the argument parser; the logic is in `vtprune.bench.core`."""

from __future__ import annotations

import argparse


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _budgets(text: str) -> list[int | float]:
    from vtprune.commands.common import budgets_arg

    return budgets_arg(text)


def _methods(text: str) -> list[str]:
    from vtprune.commands.common import names_arg

    return names_arg(text)


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit() or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"--image-size expects WxH in pixels (e.g. 640x480), got {text!r}")
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
    p.add_argument("--method", type=_methods, default=["pool"],
                   help="comma-separated methods (no pruning is always included)")
    p.add_argument("--budget", type=_budgets, default=[64],
                   help="comma-separated budgets: tokens (an int) or ratios (0.25, 1/9)")
    p.add_argument("--budget-mode", default="layer_avg", choices=["layer_avg", "retained"])
    p.add_argument("--option", action="append",
                   help="method option KEY=VALUE (every method that has it) or METHOD.KEY=VALUE (repeatable)")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--layers", type=_positive, default=None, help="keep only the first N decoder layers")
    p.add_argument("--repeats", type=_positive, default=3, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--new-tokens", type=_positive, default=8, help="tokens generated per call (>= 1)")
    p.add_argument("--image-size", type=_size, default=None, help="WxH in px (Qwen2.5-VL, LLaVA-NeXT)")
    p.add_argument("--text-tokens", type=_positive, default=64, help="random text tokens around the image")
    p.add_argument("--threads", type=_positive, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write one row per (method, budget) here")
    from vtprune.commands.common import add_format

    add_format(p)
    p.set_defaults(func=run)
    return p


def _positive(text: str) -> int:
    from vtprune.commands.common import positive_int

    return positive_int(text)


def run(args: argparse.Namespace) -> int:
    from vtprune.commands.common import (
        _parse_options,
        check_methods,
        check_model,
        options_by_method,
        print_result,
        write_json,
    )

    check_model(args.model)
    check_methods(args.method)
    per_method = options_by_method(_parse_options(args.option), args.method)
    option_sets = list(per_method.values())
    if any(opts != option_sets[0] for opts in option_sets):
        from vtprune.errors import VtpruneError

        raise VtpruneError(
            f"bench passes one set of options to every method, these differ per method: {per_method}; "
            "use options every chosen method has, or bench one method per run"
        )
    shared = option_sets[0]
    import torch

    from vtprune.bench.core import BenchConfig, bench_table, run_bench
    from vtprune.tables import from_rich, to_json

    torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        model=args.model,
        methods=args.method,
        budgets=args.budget,
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
        options=shared,
    )
    result = run_bench(cfg, progress=True)
    if args.format == "json":
        print_result(to_json(result))
    else:
        print_result(from_rich(bench_table(result)).render(args.format))
    if args.json:
        write_json(args.json, result)
    return 0
