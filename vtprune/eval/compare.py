"""`compare`: every method × budgets on the built-in benchmark -> rows, a rich table and a matplotlib plot."""

from __future__ import annotations

from pathlib import Path

import vtprune
from vtprune.errors import VtpruneError

from .shapes import run_eval

DEFAULT_BUDGETS = (576, 192, 128, 64, 32, 16)


def default_methods() -> list[str]:
    return [m for m in vtprune.methods() if m != "none" and not m.startswith("test_")]


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
) -> list[dict]:
    """Rows of `run_eval` (without per-sample records) for the full model and every (method, budget).

    A budget a method cannot reach (e.g. FastV's layer average below k·N/L), or a method that cannot act on
    the model (too few layers), gives a row with
    `infeasible` set to the error message instead of scores.
    """
    methods = list(methods) if methods else default_methods()
    cells = [("none", 576)] + [(m, b) for m in methods for b in budgets if b < 576]
    rows = []
    for i, (method, budget) in enumerate(cells):
        if progress is not None:
            progress(i, len(cells), f"{method} {budget}")
        try:
            row = run_eval(model, processor, samples, method, budget, batch_size=batch_size, image_root=image_root)
            row.pop("records")
        except VtpruneError as err:  # infeasible budget, or the method cannot act on this model
            row = {"method": method, "budget": budget, "infeasible": str(err)}
        rows.append(row)
    return rows


def plot_compare(rows: list[dict], path: str | Path, title: str = "vtprune compare") -> Path:
    """Accuracy vs layer-averaged tokens and vs prefill FLOPs, one line per method, full model as reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in rows if r["method"] == "none")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in sorted({r["method"] for r in rows} - {"none"}):
        pts = sorted(
            (r for r in rows if r["method"] == method and "accuracy" in r), key=lambda r: r["layer_avg_tokens"]
        )
        if not pts:
            continue
        axes[0].plot([r["layer_avg_tokens"] for r in pts], [100 * r["accuracy"] for r in pts], "o-", label=method)
        axes[1].plot(
            [100 * r["flops"]["exact"] / full["flops"]["exact"] for r in pts],
            [100 * r["accuracy"] for r in pts],
            "o-",
            label=method,
        )
    for ax, xlabel in zip(axes, ("layer-averaged visual tokens n̄", "prefill FLOPs, % of full (exact)"), strict=True):
        ax.axhline(100 * full["accuracy"], color="k", ls="--", lw=1, label="full model")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    console=None,
) -> list[dict]:
    """`compare` with a progress bar, then print the table and write `OUT/NAME.json` and `OUT/NAME.png`."""
    import json

    from rich.console import Console
    from rich.progress import Progress

    from .report import compare_table

    console = console or Console()
    with Progress(console=console) as bar:
        task = bar.add_task("compare", total=None)
        rows = compare(
            model,
            processor,
            samples,
            methods,
            budgets,
            batch_size=batch_size,
            image_root=image_root,
            progress=lambda i, n, what: bar.update(task, completed=i, total=n, description=what),
        )
    console.print(compare_table(rows, title=f"{title} ({len(samples)} questions)"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    plot = plot_compare(rows, out / f"{name}.png", title=f"{title}: accuracy vs tokens and FLOPs")
    console.print(f"wrote {out / f'{name}.json'} and {plot}")
    return rows
