"""`compare`: every method × budgets on the built-in benchmark -> rows, a table (any format) and a plot.

Each row has the accuracy with its Wilson 95 % interval, token counts, FLOPs and the LLM prefill time *per
sample*: one fixed batch timed over several rounds, interleaved across the cells (every cell once per
round, after a warm-up round), reported as min and median — never a single noisy round.

Cells that are not run say why: a budget >= N (the method is bypassed, identical to `none`) is skipped
and noted once; a budget the method cannot reach on this model, or a method that cannot act on it, is a
`not runnable` row with the full reason (a footnote in the table, a caption in the plot); any other
failure is an `error` row. The rows that ran are written either way.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vtprune
from vtprune.errors import VtpruneError
from vtprune.models import adapter_for

from ..stats import wilson
from .benchmark import per_seed_accuracy, seed_spread
from .shapes import run_eval
from .significance import add_significance, bits_of

DEFAULT_BUDGETS = (576, 192, 128, 64, 32, 16)
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d", "8")
LINESTYLES = ("-", "--", "-.", ":")


def default_methods() -> list[str]:
    return [m for m in vtprune.methods() if m != "none" and not m.startswith("test_")]


def visual_tokens(model) -> int:
    """Visual tokens per image of a LLaVA-1.5-style model: (image_size / patch_size)^2 (576 at 336 px / 14)."""
    vc = model.config.vision_config
    return (int(vc.image_size) // int(vc.patch_size)) ** 2


def _key(method: str, budget) -> str:
    from vtprune.tables import budget as fmt_budget

    return "none (all tokens)" if method == "none" else f"{method}@{fmt_budget(budget)}"


def compare(
    model,
    processor,
    samples,
    methods=None,
    budgets=DEFAULT_BUDGETS,
    *,
    batch_size: int = 16,
    image_root=None,
    progress=None,
    options: dict[str, dict] | None = None,
    rounds: int = 3,
    jobs: int = 1,
    model_source: str | None = None,
) -> list[dict]:
    """Rows for the full model and every (method, budget < N) (see the module docstring).

    options: {method: {option: value}}. progress(i, n, what) is called before each cell (with `jobs` > 1: as
    cells finish). jobs > 1 runs the cells in that many worker processes, each loading `model_source` (the
    `builtin:NAME` or directory `model` was loaded from) with one thread; the timing rounds always run here,
    after the cells, so that no two measurements overlap.
    Row keys: method, budget, accuracy, accuracy_ci95 [lo, hi], correct, n, correct_bits (per question "1"/"0",
    in sample order), per_seed {seed: accuracy} / seed_mean / seed_sd (v3 test seeds), per_type,
    retained_tokens, layer_avg_tokens, flops, prefill_ms_per_sample {min, median, rounds, batch}, and the paired
    tests of `significance.add_significance` (p_vs_full, p_vs, tied_best); or `infeasible` / `error` (a one-line
    reason) instead of the scores. Budgets >= N are not cells (see `skipped_budgets`).
    """
    methods = list(methods) if methods else default_methods()
    options = options or {}
    samples = list(samples)
    n_vis = visual_tokens(model)
    cells = [("none", n_vis)] + [(m, b) for m in methods for b in budgets if not _bypassed(b, n_vis)]
    cells = [(m, b, dict(options.get(m, {}))) for m, b in cells]
    steps = len(cells) + 1 + rounds  # cells, then the timing rounds (one warm-up)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise VtpruneError(f"jobs must be an int >= 1, got {jobs!r}")
    if jobs > 1 and model_source is None:
        raise VtpruneError("compare(jobs > 1) needs model_source (the builtin:NAME or directory of the model), "
                           "which each worker process loads")
    if jobs > 1 and len(cells) > 1:
        rows = _run_cells_parallel(model_source, samples, cells, jobs, batch_size, image_root, progress, steps)
    else:
        rows = []
        for i, (method, budget, opts) in enumerate(cells):
            if progress is not None:
                progress(i, steps, _key(method, budget))
            rows.append(run_cell(model, processor, samples, method, budget, opts, batch_size, image_root))
    add_significance(rows)
    ran = [r for r in rows if "accuracy" in r]

    def on_round(r: int, total: int) -> None:
        if progress is not None:
            progress(len(cells) + r, steps, f"timing round {r + 1} of {total} (the first is a warm-up)")

    timings = time_prefill(model, processor, samples, ran, rounds=rounds, batch_size=batch_size,
                           image_root=image_root, on_round=on_round)  # fmt: skip
    for row, timing in zip(ran, timings, strict=True):
        row["prefill_ms_per_sample"] = timing
    if progress is not None:
        progress(steps, steps, "done")
    return rows


def run_cell(model, processor, samples: list[dict], method: str, budget, options: dict, batch_size: int = 16,
             image_root=None) -> dict:
    """One cell of `compare`: `run_eval`'s row without per-sample records, plus correct / accuracy_ci95 /
    correct_bits / per_seed / seed_mean / seed_sd; or {method, budget, options, infeasible | error}."""
    try:
        row = run_eval(model, processor, samples, method, budget, batch_size=batch_size, image_root=image_root,
                       options=dict(options))  # fmt: skip
        records = row.pop("records")
        correct = [bool(r["correct"]) for r in records]
        row["correct"] = sum(correct)
        row["accuracy_ci95"] = list(wilson(row["correct"], row["n"]))
        row["correct_bits"] = bits_of(correct)
        row["per_seed"] = per_seed_accuracy(correct, samples)
        row["seed_mean"], row["seed_sd"] = seed_spread(row["per_seed"])
    except VtpruneError as err:  # infeasible budget, or the method cannot act on this model
        row = {"method": method, "budget": budget, "options": dict(options), "infeasible": _one_line(err)}
    except Exception as err:  # noqa: BLE001 - a failed cell must not lose the others; it is reported
        row = {"method": method, "budget": budget, "options": dict(options),
               "error": f"{type(err).__name__}: {_one_line(err)}"}  # fmt: skip
    return row


_WORKER: dict = {}


def _worker_init(model_source: str, samples: list[dict], image_root) -> None:
    """A `compare --jobs` worker: one thread, its own copy of the model, the samples once."""
    torch.set_num_threads(1)
    from .shapes import load_model

    model, processor = load_model(model_source)
    _WORKER.update(model=model, processor=processor, samples=samples, image_root=image_root)


def _worker_cell(method: str, budget, options: dict, batch_size: int) -> dict:
    w = _WORKER
    return run_cell(w["model"], w["processor"], w["samples"], method, budget, options, batch_size, w["image_root"])


def _run_cells_parallel(model_source: str, samples: list[dict], cells: list, jobs: int, batch_size: int,
                        image_root, progress, steps: int) -> list[dict]:
    """`run_cell` for every cell in `jobs` spawned processes; rows in cell order. The full model's cell and the
    costliest (largest) budgets go first so that the last cells to finish are short ones."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    def cost(i: int) -> float:
        method, budget, _ = cells[i]
        return float("inf") if method == "none" else float(budget)

    order = sorted(range(len(cells)), key=cost, reverse=True)
    rows: list[dict | None] = [None] * len(cells)
    done = 0
    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(model_source, samples, image_root)) as pool:  # fmt: skip
        futures = {pool.submit(_worker_cell, *cells[i][:2], cells[i][2], batch_size): i for i in order}
        if progress is not None:
            progress(0, steps, f"{len(cells)} cells in {jobs} processes")
        for fut in as_completed(futures):
            i = futures[fut]
            rows[i] = fut.result()
            done += 1
            if progress is not None:
                progress(done, steps, _key(*cells[i][:2]))
    return [r for r in rows if r is not None]


def _bypassed(budget, n_vis: int) -> bool:
    return isinstance(budget, int) and budget >= n_vis


def skipped_budgets(budgets, model_or_n) -> list:
    """Budgets >= N: every method is bypassed there (output identical to `none`), so no cell is run."""
    n_vis = model_or_n if isinstance(model_or_n, int) else visual_tokens(model_or_n)
    return [b for b in budgets if _bypassed(b, n_vis)]


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip()) or type(err).__name__


def _timing_batch(processor, samples, batch_size: int, image_root, device, dtype) -> dict:
    from PIL import Image

    from vtprune.testbed.tokenizer import prompt

    chunk = samples[:batch_size]
    root = Path(image_root) if image_root is not None else None
    images = []
    for s in chunk:
        img = s["image"]
        if not isinstance(img, Image.Image):
            path = Path(img)
            img = Image.open(root / path if root is not None and not path.is_absolute() else path)
        images.append(img.convert("RGB"))
    inputs = processor(images=images, text=[prompt(s["question"]) for s in chunk], return_tensors="pt", padding=True)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def time_prefill(
    model,
    processor,
    samples,
    cells: list[dict],
    *,
    rounds: int = 3,
    warmup: int = 1,
    batch_size: int = 16,
    image_root=None,
    budget_mode: str = "layer_avg",
    positions: str = "keep",
    on_round=None,
) -> list[dict]:
    """LLM prefill milliseconds per sample of each cell ({method, budget, options}) on the first `batch_size`
    samples: every cell once per round, `warmup` untimed rounds first (`on_round(r, total)` before each round).
    -> per cell {min, median, rounds, batch}.

    The time is the language model's prefill (decoder layers, in-LLM selection included; vision tower and
    pre-LLM selection excluded), divided by the batch size."""
    from vtprune.measurement.timing import PrefillTimer

    if not cells:
        return []
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs = _timing_batch(processor, list(samples), batch_size, image_root, device, dtype)
    b = int(inputs["input_ids"].shape[0])
    times: list[list[float]] = [[] for _ in cells]
    for r in range(warmup + rounds):
        if on_round is not None:
            on_round(r, warmup + rounds)
        for i, cell in enumerate(cells):
            vtprune.apply(model, cell["method"], cell["budget"], budget_mode=budget_mode, positions=positions,
                          **dict(cell.get("options") or {}))  # fmt: skip
            try:
                with torch.inference_mode(), PrefillTimer(adapter_for(model).language_model) as timer:
                    model(**inputs)
            finally:
                vtprune.remove(model)
            if r >= warmup and timer.ms:
                times[i].append(timer.ms[0] / b)
    return [
        {"min": min(t), "median": statistics.median(t), "rounds": len(t), "batch": b} if t else None for t in times
    ]


def not_runnable(rows: list[dict]) -> dict[str, list]:
    """method -> budgets whose cells did not run (infeasible or failed)."""
    out: dict[str, list] = {}
    for r in rows:
        if "accuracy" not in r:
            out.setdefault(r["method"], []).append(r["budget"])
    return out


def plot_compare(rows: list[dict], path: str | Path, title: str = "vtprune compare", n: int | None = None) -> Path:
    """Accuracy vs layer-averaged tokens and vs prefill FLOPs (% of the full model), one marker style per method,
    Wilson 95 % error bars, ticks at the budgets run, the full model as a reference band, methods that could not
    run listed under the plot and the number of questions in the title."""
    try:
        import matplotlib
    except ImportError:  # issue 20: one clear line instead of a traceback (e.g. `vtprune demo` without extras)
        raise VtpruneError("plots need matplotlib, which is not installed: pip install 'vtprune[demo]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    full = next(r for r in rows if r["method"] == "none" and "accuracy" in r)
    methods = sorted({r["method"] for r in rows if "accuracy" in r} - {"none"})
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8))
    xs_tokens: set[float] = set()
    xs_flops: set[float] = set()
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    for mi, method in enumerate(methods):
        pts = [r for r in rows if r["method"] == method and "accuracy" in r]
        pts.sort(key=lambda r: r["layer_avg_tokens"])
        style = {
            "marker": MARKERS[mi % len(MARKERS)],
            "linestyle": LINESTYLES[(mi // len(MARKERS)) % len(LINESTYLES)] if mi >= len(MARKERS) else "-",
            "color": cmap(mi % cmap.N),
            "markersize": 7,
            "markerfacecolor": "none" if mi % 2 else None,
            "markeredgewidth": 1.4,
            "capsize": 2.5,
            "elinewidth": 0.9,
            "linewidth": 1.2,
            "alpha": 0.9,
        }
        if style["markerfacecolor"] is None:
            del style["markerfacecolor"]
        # a small horizontal dodge per method (±4 % on the log axis) so equal points and their bars stay visible
        dodge = 1.0 + 0.08 * ((mi / max(1, len(methods) - 1)) - 0.5) if len(methods) > 1 else 1.0
        acc = [100 * r["accuracy"] for r in pts]
        lo = [max(0.0, 100 * (r["accuracy"] - r["accuracy_ci95"][0])) for r in pts]
        hi = [max(0.0, 100 * (r["accuracy_ci95"][1] - r["accuracy"])) for r in pts]
        tok = [r["layer_avg_tokens"] for r in pts]
        flops = [100 * r["flops"]["exact"] / full["flops"]["exact"] for r in pts]
        xs_tokens.update(tok)
        xs_flops.update(flops)
        axes[0].errorbar([t * dodge for t in tok], acc, yerr=[lo, hi], label=method, **style)
        axes[1].errorbar([f * dodge for f in flops], acc, yerr=[lo, hi], **style)
    budgets_run = sorted({r["budget"] for r in rows if "accuracy" in r and r["method"] != "none"})
    token_ticks = sorted({float(b) for b in budgets_run if isinstance(b, int)} | {round(x) for x in xs_tokens})
    flop_ticks = sorted({round(f, 1) for f in xs_flops})
    for ax, ticks, xlabel, fmt in (
        (axes[0], token_ticks, "layer-averaged visual tokens n̄ (ticks: the budgets run)", "{:g}"),
        (axes[1], flop_ticks, "LLM prefill FLOPs, % of the full model (exact)", "{:g}%"),
    ):
        lo_ci, hi_ci = full["accuracy_ci95"]
        ax.axhspan(100 * lo_ci, 100 * hi_ci, color="k", alpha=0.08, lw=0)
        ax.axhline(100 * full["accuracy"], color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ticks = _thin(ticks)
        if ticks:  # room around the points, so the small per-method dodge never reads as another x value
            ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p, f=fmt: f.format(round(v, 1))))
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%), Wilson 95 % interval")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="k", ls="--", lw=1))
    labels.append(f"full model ({100 * full['accuracy']:.1f} %, band: 95 %)")
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False, bbox_to_anchor=(1.0, 0.5))
    n = n if n is not None else full.get("n")
    fig.suptitle(f"{title} (n = {n} questions per point)" if n else title)
    missing = not_runnable(rows)
    caption = ""
    if missing:
        from vtprune.tables import budget as fmt_budget

        parts = [f"{m} @ {', '.join(fmt_budget(b) for b in bs)}" for m, bs in sorted(missing.items())]
        caption = "not runnable on this model (see the table's notes): " + "; ".join(parts)
    import textwrap

    lines = textwrap.wrap(caption, 170) if caption else []
    if lines:
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=8, va="bottom", color="#8b0000")
    fig.tight_layout(rect=(0, 0.03 + 0.035 * len(lines), 0.83, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plotting_available() -> bool:
    """Whether matplotlib can be imported (the `plot` / `demo` extra); without it commands skip their plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _thin(ticks: list[float], min_ratio: float = 1.18) -> list[float]:
    """Drop ticks closer than `min_ratio` (on a log axis) to the previous kept one, so labels do not overlap."""
    out: list[float] = []
    for t in sorted(ticks):
        if t > 0 and (not out or t / out[-1] >= min_ratio):
            out.append(t)
    return out


@dataclass
class CompareReport:
    rows: list[dict]
    json_path: Path
    plot_path: Path | None
    failed: list[str] = field(default_factory=list)  # cells asked for that did not run
    asked: int = 0


def run_compare_report(
    model,
    processor,
    samples,
    methods,
    budgets,
    out: str | Path,
    name: str,
    title: str,
    *,
    batch_size: int = 16,
    image_root=None,
    options: dict[str, dict] | None = None,
    rounds: int = 3,
    fmt: str = "table",
    console=None,
    jobs: int = 1,
    model_source: str | None = None,
    meta: dict | None = None,
) -> CompareReport:
    """`compare` with progress (stderr), then print the table (stdout, `fmt`) and write in `OUT/`: NAME.json (the
    rows that ran, and why the others did not), NAME.png (the plot), NAME-meta.json (`meta` plus wall time and
    machine), NAME.md (the budget table with intervals and significance, `v3_report.report_markdown`) and
    NAME-validity.json (Spearman ρ against the published ranking at 64 and 128 tokens, also printed on stderr)."""
    import sys
    import time

    from vtprune.progress import Progress
    from vtprune.tables import write_json

    from .report import compare_table
    from .v3_report import report_markdown, validity

    methods = list(methods) if methods else default_methods()
    t0 = time.perf_counter()
    with Progress() as bar:
        task = bar.add_task(name, total=None)
        rows = compare(
            model,
            processor,
            samples,
            methods,
            budgets,
            batch_size=batch_size,
            image_root=image_root,
            options=options,
            rounds=rounds,
            jobs=jobs,
            model_source=model_source,
            progress=lambda i, n, what: bar.update(task, completed=i, total=n, description=f"{name}: {what}"),
        )
    wall = time.perf_counter() - t0
    skipped = skipped_budgets(budgets, model)
    n_vis = visual_tokens(model)
    table = compare_table(rows, title=f"{title}, {len(samples)} questions", skipped=skipped, n_visual=n_vis)
    sys.stdout.write(table.render(fmt))
    sys.stdout.flush()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    write_json(json_path, rows)
    run_meta = {**(meta or {}), "methods": methods, "budgets_run": [b for b in budgets if b not in skipped],
                "n_questions": len(samples), "jobs": jobs, "threads": torch.get_num_threads(),
                "wall_s": round(wall, 1), "machine": _machine()}  # fmt: skip
    write_json(out / f"{name}-meta.json", run_meta)
    val = validity(rows)
    write_json(out / f"{name}-validity.json", val)
    for v in val:
        print(f"validity at {v['budget']} tokens: " + (f"Spearman rho = {v['rho']:.3f} over n = {v['n']} methods "
              f"({', '.join(v['methods'])}), published protocol {v['protocol']!r}" if "error" not in v
              else f"not computed: {v['error']}"), file=sys.stderr)  # fmt: skip
    plot_path = None
    if any("accuracy" in r for r in rows):
        if plotting_available():
            plot_path = plot_compare(rows, out / f"{name}.png", title=f"{title}: accuracy vs tokens and FLOPs",
                                     n=len(samples))  # fmt: skip
        else:
            print(f"no {name}.png: matplotlib is not installed (pip install 'vtprune[plot]')", file=sys.stderr)
    if any("accuracy" in r for r in rows) and any(r["method"] == "none" and "accuracy" in r for r in rows):
        md = report_markdown(rows, run_meta, plot_path.name if plot_path else None,
                             budgets=run_meta["budgets_run"])  # fmt: skip
        (out / f"{name}.md").write_text(md)
    print(f"wrote {json_path}" + (f" and {plot_path}" if plot_path else "") + f" ({name}.md, {name}-meta.json, "
          f"{name}-validity.json beside it)", file=sys.stderr)  # fmt: skip
    failed = [_key(r["method"], r["budget"]) for r in rows if "accuracy" not in r]
    return CompareReport(rows, json_path, plot_path, failed, len(rows))


def _machine() -> str:
    """CPU model and core count, for the record of a run."""
    import os
    import platform

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores"
