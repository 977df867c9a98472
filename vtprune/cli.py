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

    return run_demo(quick=args.quick, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="Physical visual-token pruning for HF VLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="prune a model with several methods and budgets; print the table")
    d.add_argument("--quick", action="store_true", help="fewer budgets and repeats")
    d.add_argument("--out", default="vtprune-demo", help="directory for the JSON results")
    d.set_defaults(func=_demo)
    m = sub.add_parser("methods", help="list the registered methods and their stages")
    m.set_defaults(func=_methods)
    try:
        from vtprune.testbed.cli import register as register_testbed
        from vtprune.testbed.cli import run as run_testbed

        register_testbed(sub).set_defaults(func=run_testbed)
    except ImportError:  # pragma: no cover - the testbed is part of the package
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
