"""The `vtprune` command line: `vtprune demo`, `vtprune methods`, `vtprune testbed ...`."""

from __future__ import annotations

import argparse
import sys


def _methods(args: argparse.Namespace) -> int:
    import vtprune
    from vtprune.methods import method_class

    for name in vtprune.methods():
        cls = method_class(name)
        stages = ", ".join(str(s) for s in cls().stages()) or "-"
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {stages:12s} {doc}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vtprune.demo import run_demo

    return run_demo(quick=args.quick, out=args.out, n_per_type=args.n)


def _parse_options(items: list[str]) -> dict:
    """`["k=1", "criterion=mean_received"]` -> {"k": 1, "criterion": "mean_received"}."""
    import ast

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _budget(text: str) -> int | float:
    """ "64" -> 64 tokens; "0.111" -> a ratio."""
    return int(text) if text.isdigit() else float(text)


def _eval(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from vtprune.eval.report import eval_table
    from vtprune.eval.shapes import load_model, load_samples, run_eval

    model, processor = load_model(args.model, device=args.device)
    samples, root = load_samples(args.n, args.seed, args.data)
    result = run_eval(
        model,
        processor,
        samples,
        args.method,
        _budget(args.budget),
        budget_mode=args.budget_mode,
        positions=args.positions,
        options=_parse_options(args.option),
        batch_size=args.batch,
        image_root=root,
        progress=True,
    )
    Console().print(eval_table([result], title=f"{args.model}: {args.method} @ {args.budget}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, **result}, f, indent=2)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from vtprune.eval.compare import run_compare_report
    from vtprune.eval.shapes import load_model, load_samples

    model, processor = load_model(args.model, device=args.device)
    samples, root = load_samples(args.n, args.seed, args.data)
    methods = args.methods.split(",") if args.methods else None
    budgets = [int(b) for b in args.budgets.split(",")]
    run_compare_report(
        model,
        processor,
        samples,
        methods,
        budgets,
        args.out,
        "compare",
        f"{args.model} on the shapes benchmark",
        batch_size=args.batch,
        image_root=root,
    )
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:shapes-llava", help="builtin:NAME or a model directory")
    p.add_argument("--benchmark", default="shapes", choices=["shapes"], help="benchmark (built-in: shapes)")
    p.add_argument("--data", default=None, help="exported JSONL (default: the generated held-out set)")
    p.add_argument("--n", type=int, default=None, help="questions per type (generated set) or in total (JSONL)")
    p.add_argument("--seed", type=int, default=10_002, help="seed of the generated held-out set")
    p.add_argument("--batch", type=int, default=16, help="batch size")
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="Physical visual-token pruning for HF VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="prune a model with several methods and budgets; print the table")
    d.add_argument("--quick", action="store_true", help="fewer budgets and repeats")
    d.add_argument("--out", default="vtprune-demo", help="directory for the table (JSON) and the plot")
    d.add_argument("--n", type=int, default=20, help="questions per type")
    d.set_defaults(func=_demo)
    e = sub.add_parser("eval", help="accuracy of one method and budget on the built-in benchmark")
    _add_model_args(e)
    e.add_argument("--method", default="none")
    e.add_argument("--budget", default="576", help="tokens (int) or ratio (float in (0, 1))")
    e.add_argument("--budget-mode", default="layer_avg", choices=["layer_avg", "retained"])
    e.add_argument("--positions", default="keep", choices=["keep", "reindex"])
    e.add_argument("--option", action="append", help="method option KEY=VALUE (repeatable)")
    e.add_argument("--json", default=None, help="write the result with per-sample records here")
    e.set_defaults(func=_eval)
    c = sub.add_parser("compare", help="every method × budgets on the built-in benchmark: table and plot")
    _add_model_args(c)
    c.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    c.add_argument("--budgets", default="576,192,128,64,32,16")
    c.add_argument("--out", default="vtprune-compare", help="directory for compare.json and compare.png")
    c.set_defaults(func=_compare)
    m = sub.add_parser("methods", help="list the registered methods and their stages")
    m.set_defaults(func=_methods)
    try:
        from vtprune.testbed.cli import register as register_testbed
        from vtprune.testbed.cli import run as run_testbed

        register_testbed(sub).set_defaults(func=run_testbed)
    except ImportError:  # pragma: no cover - the testbed is part of the package
        pass
    from vtprune.measurement.cli import register as register_bench

    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
