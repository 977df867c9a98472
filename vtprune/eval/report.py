"""Rich tables for evaluation results."""

from __future__ import annotations

import re

from rich.table import Table


def eval_table(results: list[dict], title: str = "") -> Table:
    """One row per result: accuracy overall and per question type, tokens, FLOPs, prefill time."""
    types = sorted({t for r in results for t in r.get("per_type", {})})
    table = Table(title=title)
    for col in ("method", "budget", "accuracy", *types, "retained", "n̄", "TFLOPs", "prefill ms"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["method"],
            str(r["budget"]),
            f"{100 * r['accuracy']:.1f}",
            *(f"{100 * r['per_type'].get(t, float('nan')):.1f}" for t in types),
            f"{r['retained_tokens']:.1f}",
            f"{r['layer_avg_tokens']:.1f}",
            f"{r['flops']['exact'] / 1e12:.4f}",
            f"{r['prefill_ms']:.1f}",
        )
    return table


def short_reason(message: str) -> str:
    """'... the smallest feasible budget is 385 ...' -> 'infeasible (min 385)'; else the first clause."""
    m = re.search(r"smallest feasible budget is (\d+)", message)
    return f"infeasible (min {m.group(1)})" if m else message.split(";")[0][:40]


def compare_table(rows: list[dict], title: str = "") -> Table:
    """Method × budget rows; infeasible cells say why."""
    full = next((r for r in rows if r["method"] == "none" and "accuracy" in r), None)
    table = Table(title=title)
    for col in ("method", "budget", "accuracy", "Δ vs full", "n̄", "FLOPs %", "prefill ms", "note"):
        table.add_column(col, justify="right")
    for r in rows:
        if "accuracy" not in r:
            table.add_row(r["method"], str(r["budget"]), "-", "-", "-", "-", "-", short_reason(r.get("infeasible", "")))
            continue
        delta = f"{100 * (r['accuracy'] - full['accuracy']):+.1f}" if full else "-"
        flops = f"{100 * r['flops']['exact'] / full['flops']['exact']:.1f}" if full else "-"
        table.add_row(
            r["method"],
            str(r["budget"]),
            f"{100 * r['accuracy']:.1f}",
            delta,
            f"{r['layer_avg_tokens']:.1f}",
            flops,
            f"{r['prefill_ms']:.1f}",
            "",
        )
    return table
