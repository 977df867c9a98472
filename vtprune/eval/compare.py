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

from .intervals import wilson
from .shapes import run_eval

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
) -> list[dict]:
    """Rows for the full model and every (method, budget < N) (see the module docstring).

    options: {method: {option: value}}. progress(i, n, what) is called before each cell.
    Row keys: method, budget, accuracy, accuracy_ci95 [lo, hi], correct, n, per_type, retained_tokens,
    layer_avg_tokens, flops, prefill_ms_per_sample {min, median, rounds, batch}; or `infeasible` / `error`
    (a one-line reason) instead of the scores. Budgets >= N are not cells (see `skipped_budgets`).
    """
    methods = list(methods) if methods else default_methods()
    options = options or {}
    n_vis = visual_tokens(model)
    cells = [("none", n_vis)] + [(m, b) for m in methods for b in budgets if not _bypassed(b, n_vis)]
    rows = []
    steps = len(cells) + 1 + rounds  # cells, then the timing rounds (one warm-up)
    for i, (method, budget) in enumerate(cells):
        if progress is not None:
            progress(i, steps, _key(method, budget))
        opts = dict(options.get(method, {}))
        try:
            row = run_eval(
                model, processor, samples, method, budget, batch_size=batch_size, image_root=image_root, options=opts
            )
            records = row.pop("records")
            row["correct"] = sum(bool(r["correct"]) for r in records)
            row["accuracy_ci95"] = list(wilson(row["correct"], row["n"]))
        except VtpruneError as err:  # infeasible budget, or the method cannot act on this model
            row = {"method": method, "budget": budget, "options": opts, "infeasible": _one_line(err)}
        except Exception as err:  # noqa: BLE001 - a failed cell must not lose the others; it is reported
            row = {"method": method, "budget": budget, "options": opts, "error": f"{type(err).__name__}: "
                   f"{_one_line(err)}"}  # fmt: skip
        rows.append(row)
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
                with torch.inference_mode(), PrefillTimer(model.model.language_model) as timer:
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
) -> CompareReport:
    """`compare` with progress (stderr), then print the table (stdout, `fmt`) and write `OUT/NAME.json` and
    `OUT/NAME.png` (the rows that ran, and why the others did not)."""
    import sys

    from vtprune.progress import Progress
    from vtprune.tables import write_json

    from .report import compare_table

    methods = list(methods) if methods else default_methods()
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
            progress=lambda i, n, what: bar.update(task, completed=i, total=n, description=f"{name}: {what}"),
        )
    skipped = skipped_budgets(budgets, model)
    n_vis = visual_tokens(model)
    table = compare_table(rows, title=f"{title}, {len(samples)} questions", skipped=skipped, n_visual=n_vis)
    sys.stdout.write(table.render(fmt))
    sys.stdout.flush()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    write_json(json_path, rows)
    plot_path = None
    if any("accuracy" in r for r in rows):
        if plotting_available():
            plot_path = plot_compare(rows, out / f"{name}.png", title=f"{title}: accuracy vs tokens and FLOPs",
                                     n=len(samples))  # fmt: skip
        else:
            print(f"no {name}.png: matplotlib is not installed (pip install 'vtprune[plot]')", file=sys.stderr)
    print(f"wrote {json_path}" + (f" and {plot_path}" if plot_path else ""), file=sys.stderr)
    failed = [_key(r["method"], r["budget"]) for r in rows if "accuracy" not in r]
    return CompareReport(rows, json_path, plot_path, failed, len(rows))
