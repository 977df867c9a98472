"""The `vtprune` command line: `vtprune demo`, `methods`, `eval`, `compare`, `hard-subset`, `run`, `show`, `testbed`,
`bench`, `train-rcp`."""

from __future__ import annotations

import argparse
import sys


def _methods(args: argparse.Namespace) -> int:
    import vtprune
    from vtprune.errors import VtpruneError
    from vtprune.methods import method_class

    for name in vtprune.methods():
        cls = method_class(name)
        try:
            stages = ", ".join(str(s) for s in cls().stages()) or "-"
        except VtpruneError:  # stages that depend on the model or a checkpoint (e.g. RCP's trained layers)
            stages = "(per model)"
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


def _load_for_run(args: argparse.Namespace):
    import torch

    from vtprune.runner import load

    torch.set_num_threads(args.threads)
    return load(args.model, device=args.device, dtype=getattr(torch, args.dtype), layers=args.layers)


def _run(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.markup import escape

    from vtprune.errors import VtpruneError
    from vtprune.runner import result_table, run_one

    loaded = _load_for_run(args)
    try:
        result = run_one(
            loaded,
            args.image,
            args.prompt,
            args.method,
            _budget(args.budget),
            budget_mode=args.budget_mode,
            positions=args.positions,
            options=_parse_options(args.option),
            max_new_tokens=args.max_new_tokens,
        )
    except VtpruneError as err:
        raise SystemExit(f"vtprune run: {err}") from None
    console = Console()
    if loaded.note:
        console.print(f"[yellow]note:[/yellow] {loaded.note}")
    console.print(f"[bold]answer:[/bold] {escape(result['answer'])}", soft_wrap=True, highlight=False)
    console.print(result_table(result, title=f"{args.model}: {args.method} @ {args.budget} ({args.budget_mode})"))
    if args.json:
        keep = {k: v for k, v in result.items() if k not in ("record", "events")}
        keep["events"] = [{**e, "keep_idx": e["keep_idx"].tolist()} for e in result["events"]]
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "image": str(args.image), "prompt": args.prompt, **keep}, f, indent=2)
    return 0


def _show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from vtprune.errors import VtpruneError
    from vtprune.show import show

    loaded = _load_for_run(args)
    try:
        res = show(
            loaded,
            args.image,
            args.prompt,
            args.methods,
            _budget(args.budget),
            args.out,
            budget_mode=args.budget_mode,
            positions=args.positions,
            options=_parse_options(args.option),
            max_new_tokens=args.max_new_tokens,
        )
    except VtpruneError as err:
        raise SystemExit(f"vtprune show: {err}") from None
    console = Console()
    if loaded.note:
        console.print(f"[yellow]note:[/yellow] {loaded.note}")
    for r in res.results:
        if "error" in r:
            console.print(f"{r['method']} @ {r['budget']}: [red]not run[/red]: {escape(r['error'])}", soft_wrap=True)
            continue
        events = ", ".join(
            f"{e['stage']}: {len(e['keep_idx'])} kept"
            + (f" ({len(e['merged_idx'])} merged)" if e["merged_idx"] else "")
            for e in r["events"]
        )
        console.print(
            f"{r['method']} @ {r['budget']}: answer {escape(repr(r['answer']))}; retained {r['retained_tokens']}, "
            f"n̄ {r['layer_avg_tokens']:.1f} of {r['n_visual']}; {events or 'no pruning'}",
            soft_wrap=True,
        )
    console.print(f"picture: {res.path} ({res.image.width}×{res.image.height})", soft_wrap=True, highlight=False)
    return 0


def _calibrate_dcp(args: argparse.Namespace) -> int:
    import torch

    from vtprune.methods._dcp_calibration import calibrate_folder, model_key, write_tau
    from vtprune.runner import load

    torch.set_num_threads(args.threads)
    loaded = load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    tau = calibrate_folder(
        loaded.model,
        loaded.processor,
        args.images,
        n_images=args.n,
        budget_ratio=args.ratio,
        percentile=args.percentile,
        prompt=args.prompt,
        batch_size=args.batch,
    )
    key = args.key or model_key(loaded.model)
    print(
        f"tau_kappa = {tau:.6g} for {key!r} ({args.n} images of {args.images}, ρ = {args.ratio:.4g}, "
        f"{args.percentile:g}th percentile)"
    )
    if args.write:
        path = write_tau(key, tau, args.write if args.write != "-" else None, images=str(args.images), n=args.n)
        print(f"written to {path}")
    return 0


def _hard_subset(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from vtprune.eval.hard_subset import hard_subset_report, hard_subset_table, load_results

    try:
        results = [r for path in args.results for r in load_results(path, args.metric)]
        rows = hard_subset_report(results, args.baseline)
    except (OSError, KeyError, ValueError) as err:
        raise SystemExit(f"vtprune hard-subset: {err}") from None
    console = Console()
    if not console.is_terminal:  # a log or a pipe: do not squeeze the table into 80 columns
        console = Console(width=120)
    console.print(hard_subset_table(rows, per_type=args.per_type))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _add_one_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:shapes-llava", help="builtin:NAME, a model directory or arch:NAME")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question (wrapped in the model's chat template)")
    p.add_argument("--budget", default="64", help="tokens (int) or ratio (float in (0, 1))")
    p.add_argument("--budget-mode", default="layer_avg", choices=["layer_avg", "retained"])
    p.add_argument("--positions", default="keep", choices=["keep", "reindex"])
    p.add_argument("--option", action="append", help="method option KEY=VALUE (show: or METHOD.KEY=VALUE)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=int, default=None, help="arch:NAME only: keep the first N decoder layers")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


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
    r = sub.add_parser("run", help="one image + prompt through a pruned model: answer, tokens, FLOPs, timing")
    _add_one_image_args(r)
    r.add_argument("--method", default="none")
    r.add_argument("--json", default=None, help="write the result (with kept indices per event) here")
    r.set_defaults(func=_run)
    s = sub.add_parser("show", help="PNG of the image with each method's kept tokens drawn over it")
    _add_one_image_args(s)
    s.add_argument("--methods", default="pool", help="comma-separated, side by side; NAME@BUDGET overrides --budget")
    s.add_argument("--out", default="vtprune-show.png", help="PNG path")
    s.set_defaults(func=_show, max_new_tokens=8)
    k = sub.add_parser("calibrate-dcp", help="DCP-Prune's trigger threshold τ_κ from a folder of images")
    k.add_argument("--model", default="builtin:shapes-llava", help="builtin:NAME or a model directory")
    k.add_argument("--images", required=True, help="folder of images (spec: COCO val2017, lowest ids first)")
    k.add_argument("--n", type=int, default=256, help="images to use (first N by file name)")
    k.add_argument("--ratio", type=float, default=1 / 9, help="reference budget ratio ρ_ref (K = ρ·N)")
    k.add_argument("--percentile", type=float, default=90.0)
    k.add_argument(
        "--prompt",
        default=None,
        help="full prompt (default: 'Describe this image briefly.' in the model's chat template)",
    )
    k.add_argument("--batch", type=int, default=8)
    k.add_argument("--key", default=None, help="table key (default: builtin:NAME or the model path)")
    k.add_argument(
        "--write",
        nargs="?",
        const="-",
        default=None,
        help="store the value in the shipped table (or in the given JSON file)",
    )
    k.add_argument("--device", default="cpu")
    k.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    k.add_argument("--threads", type=int, default=1)
    k.set_defaults(func=_calibrate_dcp)
    h = sub.add_parser(
        "hard-subset",
        help="a method's accuracy on the samples the downsample/pool baseline gets wrong vs right",
    )
    h.add_argument(
        "results",
        nargs="+",
        help="per-sample results: `vtprune eval --json` files, lmms-eval samples JSONL or output directories",
    )
    h.add_argument("--baseline", default=None, help="baseline method or results file name (default: downsample, pool)")
    h.add_argument("--metric", default=None, help="lmms-eval per-sample score (default: exact_match, acc, ...)")
    h.add_argument("--per-type", action="store_true", help="a row per question type too")
    h.add_argument("--json", default=None, help="write the report (with per-type blocks) here")
    h.set_defaults(func=_hard_subset)
    m = sub.add_parser("methods", help="list the registered methods and their stages")
    m.set_defaults(func=_methods)
    try:
        from vtprune.testbed.cli import register as register_testbed
        from vtprune.testbed.cli import run as run_testbed

        register_testbed(sub).set_defaults(func=run_testbed)
    except ImportError:  # pragma: no cover - the testbed is part of the package
        pass
    from vtprune.measurement.cli import register as register_bench
    from vtprune.rcp.cli import add_parser as register_train_rcp

    register_bench(sub)
    register_train_rcp(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
