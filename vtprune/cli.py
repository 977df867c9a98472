"""The `vtprune` command line: `vtprune demo`, `methods`, `eval`, `compare`, `hard-subset`, `run`, `show`, `testbed`,
`bench`, `train-rcp`, `calibrate-dcp`.

Conventions of every command:
- start-up is cheap: nothing heavy (torch, transformers, the methods) is imported before the arguments parse;
- results go to stdout (`--format table|markdown|csv|json`), progress and file notices to stderr;
- exit status 0 when everything asked for ran, 1 when results are partial (written, failures listed),
  2 for a user error, reported in one line (`--debug` anywhere on the line shows the traceback);
- method options: `--option KEY=VALUE` (every chosen method that has KEY) or `--option METHOD.KEY=VALUE`;
- default output folders live under `vtprune-out/` (git-ignored in the repository).
"""

from __future__ import annotations

import argparse
import sys

from vtprune.commands.common import (  # noqa: F401  (re-exported: the public helpers of the command line)
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    OUT_ROOT,
    USER_ERRORS,
    ArgumentsError,
    Parser,
    PartialResults,
    UsageError,
    _parse_options,
    add_format,
    add_lazy_parser,
    answers_match,
    budget_arg,
    budgets_arg,
    check_methods,
    check_model,
    check_path,
    default_model,
    guarded,
    missing_builtin,
    names_arg,
    notice,
    one_line,
    options_by_method,
    parse_budget,
    positions_arg,
    positive_int,
    print_result,
    split_debug,
    write_json,
)
from vtprune.errors import VtpruneError


# --- commands ---------------------------------------------------------------------------------------------
def _methods(args: argparse.Namespace) -> int:
    from vtprune.registry import method_class, method_names
    from vtprune.tables import Col, ResultTable

    cols = [Col("name", "name", "l"), Col("stages", "stages", "l"), Col("doc", "what it does", "l", wrap=True)]
    table = ResultTable("registered pruning methods", cols, key_columns=1)
    for name in method_names():
        cls = method_class(name)
        try:
            stages = ", ".join(str(s) for s in cls().stages()) or "-"
        except VtpruneError:  # stages that depend on the model or a checkpoint (e.g. RCP's trained layers)
            stages = "(per model)"
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table.add({"name": name, "stages": stages, "doc": doc})
    print_result(table.render(args.format))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vtprune.demo import run_demo

    if args.model is not None:
        check_model(args.model)
    return run_demo(quick=args.quick, out=args.out, n_per_type=args.n, fmt=args.format, model=args.model,
                    jobs=args.jobs)  # fmt: skip


def _read_data_checked(args: argparse.Namespace):
    """--data (an exported JSONL), read and checked before any model is loaded -> (samples, image root); None
    without --data."""
    from vtprune.eval.shapes import read_samples

    if args.data is None:
        return None
    if args.test_seeds is not None or args.seed is not None:
        raise UsageError("give either --data or --seed / --test-seeds (questions generated from seeds), not both")
    check_path(args.data, "data file", "file")
    try:
        samples, root = read_samples(args.data, args.n)
    except VtpruneError:
        raise
    except ValueError as err:  # a line that is not JSON (the reader names the line where it can)
        raise UsageError(f"cannot read {args.data}: {one_line(err)} (expected one JSON object per line)") from None
    if not samples:
        raise UsageError(f"no questions to score in {args.data} (an empty input is refused)")
    need = ("image", "question", "answer", "type")
    for i, s in enumerate(samples, 1):
        missing = [k for k in need if not isinstance(s, dict) or k not in s]
        if missing:
            raise UsageError(f"{args.data}: record {i} lacks {', '.join(missing)} (each line needs {', '.join(need)})")
    return samples, root


def _load_samples_checked(args: argparse.Namespace, benchmark: str, data=None):
    """The questions of `eval` / `compare` for a model of `benchmark` (`vtprune.eval.benchmark.benchmark_of`):
    `data` (from `_read_data_checked`), else generated: v3, the test split at --test-seeds; v2, the held-out
    --seed. The other benchmark's seed option is refused in one line."""
    from vtprune.eval.benchmark import V3, parse_seeds
    from vtprune.eval.shapes import load_benchmark_samples

    if data is not None:
        return data
    seeds = None
    if benchmark == V3:
        if args.seed is not None:
            raise UsageError(f"--seed is the v2 held-out seed; {args.model} is a shapes-v3 model: use --test-seeds "
                             "(held-out test split seeds, default 30000,30001,30002)")
        seeds = parse_seeds(args.test_seeds) if args.test_seeds is not None else None
    elif args.test_seeds is not None:
        raise UsageError(f"--test-seeds applies to shapes-v3 models; {args.model} answers the v2 benchmark "
                         "(use --seed, default 10002)")
    return load_benchmark_samples(benchmark, args.n, args.seed, None, seeds)


def _eval(args: argparse.Namespace) -> int:
    check_methods([args.method])
    options = options_by_method(_parse_options(args.option), [args.method])[args.method]
    import torch

    from vtprune.eval.benchmark import benchmark_of, per_seed_accuracy, seed_spread
    from vtprune.eval.compare import time_prefill
    from vtprune.eval.report import eval_table
    from vtprune.eval.shapes import load_model, run_eval
    from vtprune.stats import wilson

    data = _read_data_checked(args)
    check_model(args.model)
    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model, device=args.device)
    samples, root = _load_samples_checked(args, benchmark_of(processor), data)
    result = run_eval(
        model,
        processor,
        samples,
        args.method,
        args.budget,
        budget_mode=args.budget_mode,
        positions=args.positions,
        options=options,
        batch_size=args.batch,
        image_root=root,
        progress=True,
    )
    k = sum(bool(r["correct"]) for r in result["records"])
    result["correct"] = k
    result["accuracy_ci95"] = list(wilson(k, result["n"]))
    result["per_seed"] = per_seed_accuracy([bool(r["correct"]) for r in result["records"]], samples)
    result["seed_mean"], result["seed_sd"] = seed_spread(result["per_seed"])
    cell = {"method": args.method, "budget": args.budget, "options": options}
    timing = time_prefill(model, processor, samples, [cell], rounds=args.rounds, batch_size=args.batch,
                          image_root=root, budget_mode=args.budget_mode, positions=args.positions)  # fmt: skip
    result["prefill_ms_per_sample"] = timing[0]
    title = f"{args.model}: {_label(args.method, args.budget)}, {result['n']} questions"
    table = eval_table([result], title=title)
    if result["per_seed"]:
        table.footer.append("per held-out test seed: " + ", ".join(f"{seed} {100 * a:.1f} %" for seed, a in
                            result["per_seed"].items()) + (f" (mean {100 * result['seed_mean']:.1f}, sd "
                            f"{100 * result['seed_sd']:.1f} points)" if result["seed_sd"] is not None else ""))
    print_result(table.render(args.format))
    if args.json:
        write_json(args.json, {"model": args.model, **result})
    return 0


def _label(method: str, budget) -> str:
    from vtprune.tables import budget as fmt_budget

    return "none (all tokens)" if method == "none" else f"{method} @ {fmt_budget(budget)}"


def _compare(args: argparse.Namespace) -> int:
    methods = args.methods
    if methods is not None:
        check_methods(methods)
    from vtprune.eval.benchmark import V3, benchmark_of
    from vtprune.eval.compare import default_methods, run_compare_report
    from vtprune.eval.shapes import load_model

    options = options_by_method(_parse_options(args.option), methods or default_methods())
    import torch

    data = _read_data_checked(args)
    check_model(args.model)
    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model, device=args.device)
    benchmark = benchmark_of(processor)
    samples, root = _load_samples_checked(args, benchmark, data)
    if args.jobs > 1 and (args.device != "cpu" or root is not None):
        raise UsageError("--jobs > 1 runs cells in CPU worker processes on generated questions: drop --jobs, "
                         "or --device / --data")
    seeds = sorted({s["split"] for s in samples if isinstance(s, dict) and s.get("split")})
    meta = {"model": args.model, "benchmark": benchmark, "command": "vtprune " + " ".join(sys.argv[1:]),
            "test_seeds": [int(t.split(":")[1]) for t in seeds] if benchmark == V3 and args.data is None else [],
            "n_per_type": _n_per_type(samples), "batch": args.batch, "rounds": args.rounds}  # fmt: skip
    report = run_compare_report(
        model,
        processor,
        samples,
        methods,
        args.budgets,
        args.out,
        "compare",
        f"{args.model} on the {benchmark} benchmark",
        batch_size=args.batch,
        image_root=root,
        options=options,
        rounds=args.rounds,
        fmt=args.format,
        jobs=args.jobs,
        model_source=args.model,
        meta=meta,
    )
    if report.failed:
        raise PartialResults(f"{len(report.failed)} of {report.asked} cells did not run ({', '.join(report.failed)}); "
                             f"the others are in {report.json_path}")  # fmt: skip
    return 0


def _n_per_type(samples: list[dict]) -> int | None:
    """Questions per type (and seed, for v3 test samples) when every group has the same count, else None."""
    from collections import Counter

    counts = set(Counter((s.get("split"), s.get("type")) for s in samples).values())
    return counts.pop() if len(counts) == 1 else None


def _load_for_run(args: argparse.Namespace):
    check_model(args.model)
    check_path(args.image, "image", "file")
    import torch

    from vtprune.loading import load

    torch.set_num_threads(args.threads)
    return load(args.model, device=args.device, dtype=getattr(torch, args.dtype), layers=args.layers)


def _run(args: argparse.Namespace) -> int:
    check_methods([args.method])
    options = options_by_method(_parse_options(args.option), [args.method])[args.method]
    loaded = _load_for_run(args)
    from vtprune.single import run_one
    from vtprune.tables import ResultTable

    result = run_one(
        loaded,
        args.image,
        args.prompt,
        args.method,
        args.budget,
        budget_mode=args.budget_mode,
        positions=args.positions,
        options=options,
        max_new_tokens=args.max_new_tokens,
    )
    keep = {k: v for k, v in result.items() if k not in ("record", "events")}
    keep["events"] = [{**e, "keep_idx": e["keep_idx"].tolist()} for e in result["events"]]
    payload = {"model": args.model, "image": str(args.image), "prompt": args.prompt, **keep}
    if args.format == "json":
        from vtprune.tables import to_json

        print_result(to_json(payload))
    else:
        title = f"{args.model}: {_label(args.method, args.budget)} ({args.budget_mode})"
        table: ResultTable = run_table(result, title)
        if loaded.note:
            table.footer.append(f"note: {loaded.note}")
        print_result(table.render(args.format))
    if args.json:
        write_json(args.json, payload)
    return 0


def run_table(result: dict, title: str):
    """`vtprune run` as a two-column table: the answer, tokens, FLOPs (with units), times."""
    from vtprune.tables import Col, ResultTable, si

    t = ResultTable(title, [Col("what", "", "l"), Col("value", "value", "l", wrap=True)], key_columns=1)
    t.add({"what": "answer", "value": repr(result["answer"])})
    t.add({"what": "visual tokens (N)", "value": result["n_visual"]})
    t.add({"what": "text tokens", "value": result["n_text"]})
    t.add({"what": "retained (entering layer 0)", "value": result["retained_tokens"]})
    t.add({"what": "layer-averaged n̄", "value": f"{result['layer_avg_tokens']:.1f}"})
    for conv in ("exact", "fastv", "swiglu"):
        p, u = result["flops"][conv], result["flops_unpruned"][conv]
        t.add({"what": f"LLM prefill ({conv})", "value": f"{si(p)} of {si(u)} unpruned ({100 * p / u:.1f} %)"})
    t.add({"what": "LLM prefill ms (one call)", "value": f"{result['prefill_ms']:.1f}"})
    t.add({"what": f"total ms (generate, {result['new_tokens']} tokens)", "value": f"{result['total_ms']:.1f}"})
    return t


def _show(args: argparse.Namespace) -> int:
    from vtprune.show import parse_methods

    chosen = parse_methods(args.methods, args.budget)
    names = list(dict.fromkeys(name for name, _ in chosen))
    check_methods(names)
    options = _parse_options(args.option)
    options_by_method(options, names)  # validate before loading anything
    loaded = _load_for_run(args)
    from vtprune.show import show

    res = show(
        loaded,
        args.image,
        args.prompt,
        chosen,
        args.budget,
        args.out,
        budget_mode=args.budget_mode,
        positions=args.positions,
        options=options,
        max_new_tokens=args.max_new_tokens,
        expected=args.expected,
    )
    table = show_table(res.results, f"{args.model}: {args.prompt!r}", expected=args.expected)
    if loaded.note:
        table.footer.append(f"note: {loaded.note}")
    print_result(table.render(args.format))
    notice(f"picture: {res.path} ({res.image.width}×{res.image.height})")
    failed = [_label(r["method"], r["budget"]) for r in res.results if "error" in r]
    if failed:
        raise PartialResults(f"{len(failed)} of {len(res.results)} methods did not run ({', '.join(failed)}); "
                             f"the picture shows why")  # fmt: skip
    return 0


def show_table(results: list[dict], title: str, expected: str | None = None):
    from vtprune.tables import Col, ResultTable
    from vtprune.tables import budget as fmt_budget

    cols = [Col("method", "method", "l"), Col("budget", "budget", fmt=fmt_budget),
            Col("answer", "answer", "l", wrap=True)]  # fmt: skip
    if expected is not None:
        cols.append(Col("correct", "correct", fmt=lambda v: "yes" if v else "no"))
    cols += [Col("retained", "retained"), Col("n_bar", "n̄", fmt=lambda v: f"{v:.1f}"), Col("events", "kept", "l")]
    t = ResultTable(title, cols)
    for r in results:
        if "error" in r:
            t.add({"method": r["method"], "budget": r["budget"]}, note=f"{_label(r['method'], r['budget'])}: "
                  f"not run: {r['error']}")  # fmt: skip
            continue
        events = "; ".join(
            f"{len(e['keep_idx'])} of {r['n_visual']}" + (f", {len(e['merged_idx'])} merged" if e["merged_idx"] else "")
            for e in r["events"]
        )
        row = {"method": r["method"], "budget": "all" if r["method"] == "none" else r["budget"],
               "answer": r["answer"], "retained": r["retained_tokens"], "n_bar": r["layer_avg_tokens"],
               "events": events or "all"}  # fmt: skip
        if expected is not None:
            row["correct"] = answers_match(r["answer"], expected)
        t.add(row)
    if expected is not None:
        t.footer.append(f"expected answer: {expected!r}")
    return t


def _calibrate_dcp(args: argparse.Namespace) -> int:
    check_model(args.model)
    check_path(args.images, "image folder", "dir")
    import torch

    from vtprune.calibration.dcp import calibrate_folder, model_key, write_tau
    from vtprune.loading import load

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
        notice(f"written to {path}")
    return 0


def _hard_subset(args: argparse.Namespace) -> int:
    from vtprune.eval.hard_subset import hard_subset_report, hard_subset_table, load_results
    from vtprune.tables import from_rich, to_json

    for path in args.results:
        check_path(path, "results")
    try:
        results = [r for path in args.results for r in load_results(path, args.metric)]
        rows = hard_subset_report(results, args.baseline)
    except (KeyError, ValueError) as err:  # malformed results files
        raise UsageError(one_line(err)) from None
    if args.format == "json":
        print_result(to_json(rows))
    else:
        print_result(from_rich(hard_subset_table(rows, per_type=args.per_type)).render(args.format))
    if args.json:
        write_json(args.json, rows)
    return 0


def _add_one_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=default_model(), help="builtin:NAME, a model directory or arch:NAME")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question (wrapped in the model's chat template)")
    p.add_argument("--budget", type=budget_arg, default=64, help="tokens (an int) or a ratio (0.25, 1/9)")
    p.add_argument("--budget-mode", default="layer_avg", choices=["layer_avg", "retained"])
    p.add_argument("--positions", default="keep", type=positions_arg,
                   help="keep | reindex | one per stage, e.g. reindex,keep,reindex")
    p.add_argument("--option", action="append", help="method option KEY=VALUE or METHOD.KEY=VALUE (repeatable)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=positive_int, default=None, help="arch:NAME only: keep the first N decoder layers")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    add_format(p)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=default_model(),
                   help=f"builtin:NAME or a model directory (default {default_model()})")
    p.add_argument("--benchmark", default="shapes", choices=["shapes"],
                   help="benchmark (built-in: shapes; v2 or v3 questions follow the model's vocabulary)")
    p.add_argument("--data", default=None, help="exported JSONL (default: the generated held-out set)")
    p.add_argument("--n", type=positive_int, default=None,
                   help="questions per type: v3 per type and test seed (default 20: the full compare table in "
                        "about 40 min on one core), v2 (default 50); with --data: in total")  # fmt: skip
    p.add_argument("--test-seeds", default=None,
                   help="v3 models: held-out test split seeds, comma-separated (default 30000,30001,30002)")
    p.add_argument("--seed", type=int, default=None, help="v2 models: seed of the generated held-out set (10002)")
    p.add_argument("--batch", type=positive_int, default=16, help="batch size")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="timing: interleaved prefill rounds per cell on one batch (min and median per sample)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    p.add_argument("--option", action="append", help="method option KEY=VALUE or METHOD.KEY=VALUE (repeatable)")
    add_format(p)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vtprune",
        description="Physical visual-token pruning for HF VLMs. Exit status: 0 all ran, 1 partial results "
        "(written, failures listed), 2 user error (one line; --debug anywhere shows the traceback).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    d = sub.add_parser("demo", help="prune a model with several methods and budgets; print the table")
    d.add_argument("--quick", action="store_true", help="fewer budgets and questions")
    d.add_argument("--out", default=f"{OUT_ROOT}/demo", help="folder for the table (JSON) and the plots")
    d.add_argument("--model", default=None,
                   help=f"builtin:NAME or a model directory (default {default_model()}; when it is not installed, "
                        "builtin:shapes-llava, else a random model)")
    d.add_argument("--n", type=positive_int, default=None, help="questions per type (default: v3 10, v2 20)")
    d.add_argument("--jobs", type=positive_int, default=1,
                   help="worker processes for the cells (v3 model; 2 helps only on an otherwise idle machine)")
    add_format(d)
    d.set_defaults(func=_demo)
    e = sub.add_parser("eval", help="accuracy of one method and budget on the built-in benchmark")
    _add_model_args(e)
    e.add_argument("--method", default="none")
    e.add_argument("--budget", type=budget_arg, default=576, help="tokens (an int) or a ratio (0.25, 1/9)")
    e.add_argument("--budget-mode", default="layer_avg", choices=["layer_avg", "retained"])
    e.add_argument("--positions", default="keep", type=positions_arg,
                   help="keep | reindex | one per stage, e.g. reindex,keep,reindex")
    e.add_argument("--json", default=None, help="write the result with per-sample records here")
    e.set_defaults(func=_eval)
    c = sub.add_parser("compare", help="every method × budgets on the built-in benchmark: table and plot")
    _add_model_args(c)
    c.add_argument("--methods", type=names_arg, default=None, help="comma-separated (default: every registered method)")
    c.add_argument("--budgets", type=budgets_arg, default=[576, 192, 128, 64, 32, 16], help="comma-separated")
    c.add_argument("--out", default=f"{OUT_ROOT}/compare",
                   help="folder for compare.json / .png / .md / -meta.json / -validity.json")
    c.add_argument("--jobs", type=positive_int, default=1,
                   help="run the cells in this many processes (one thread each; timing rounds after, in one)")
    c.set_defaults(func=_compare)
    r = sub.add_parser("run", help="one image + prompt through a pruned model: answer, tokens, FLOPs, timing")
    _add_one_image_args(r)
    r.add_argument("--method", default="none")
    r.add_argument("--json", default=None, help="write the result (with kept indices per event) here")
    r.set_defaults(func=_run)
    s = sub.add_parser("show", help="PNG of the image with each method's kept tokens drawn over it")
    _add_one_image_args(s)
    s.add_argument("--methods", default="pool", help="comma-separated, side by side; NAME@BUDGET overrides --budget")
    s.add_argument("--expected", default=None, help="the expected answer: each method's answer is marked right/wrong")
    s.add_argument("--out", default=f"{OUT_ROOT}/show.png", help="PNG path")
    s.set_defaults(func=_show, max_new_tokens=8)
    k = sub.add_parser("calibrate-dcp", help="DCP-Prune's trigger threshold τ_κ from a folder of images")
    k.add_argument("--model", default=default_model(), help="builtin:NAME or a model directory")
    k.add_argument("--images", required=True, help="folder of images (spec: COCO val2017, lowest ids first)")
    k.add_argument("--n", type=positive_int, default=256, help="images to use (first N by file name)")
    k.add_argument("--ratio", type=float, default=1 / 9, help="reference budget ratio ρ_ref (K = ρ·N)")
    k.add_argument("--percentile", type=float, default=90.0)
    k.add_argument(
        "--prompt",
        default=None,
        help="full prompt (default: 'Describe this image briefly.' in the model's chat template)",
    )
    k.add_argument("--batch", type=positive_int, default=8)
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
    k.add_argument("--threads", type=positive_int, default=1)
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
    add_format(h)
    h.set_defaults(func=_hard_subset)
    m = sub.add_parser("methods", help="list the registered methods and their stages")
    add_format(m)
    m.set_defaults(func=_methods)
    from vtprune.commands.bench import register as register_bench
    from vtprune.commands.rcp import add_parser as register_train_rcp
    from vtprune.commands.testbed import register as register_testbed
    from vtprune.commands.testbed import run as run_testbed

    register_testbed(sub).set_defaults(func=run_testbed)
    register_bench(sub)
    register_train_rcp(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn user errors into one line + exit status 2 (see the module docstring)."""
    args_list, debug = split_debug(sys.argv[1:] if argv is None else argv)

    def go() -> int:
        args = build_parser().parse_args(args_list)
        return int(args.func(args) or 0)

    return guarded(go, "vtprune", debug)


if __name__ == "__main__":  # `python -m vtprune.cli`: run the importable module (one `Parser` class, not two)
    from vtprune.cli import main as _main

    sys.exit(_main())
