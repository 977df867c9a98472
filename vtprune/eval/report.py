"""Result tables of `eval` and `compare` (`vtprune.tables.ResultTable`: table / markdown / csv / json)."""

from __future__ import annotations

import re

from vtprune.tables import Col, ResultTable, budget, ms, pct, si


def _ci(v) -> str:
    return f"{100 * v[0]:.1f}–{100 * v[1]:.1f}"


def _budget(row: dict) -> object:
    return "all" if row["method"] == "none" else row["budget"]


def _timing(row: dict, which: str):
    t = row.get("prefill_ms_per_sample")
    return t[which] if t else None


def _timing_footer(rows: list[dict]) -> str | None:
    t = next((r["prefill_ms_per_sample"] for r in rows if r.get("prefill_ms_per_sample")), None)
    if not t:
        return None
    return (
        f"ms min / ms med: LLM prefill per sample (decoder layers incl. in-LLM selection; batch of {t['batch']}), "
        f"min and median of {t['rounds']} round{'s' if t['rounds'] != 1 else ''} interleaved across the rows after a "
        "warm-up round."
    )


def eval_table(results: list[dict], title: str = "") -> ResultTable:
    """One row per result: accuracy with its 95 % interval, per question type, tokens, FLOPs, prefill time."""
    types = sorted({t for r in results for t in r.get("per_type", {})})
    cols = [Col("method", "method", "l"), Col("budget", "budget", fmt=budget), Col("accuracy", "acc %", fmt=pct),
            Col("accuracy_ci95", "95% CI", fmt=_ci), Col("n", "n")]  # fmt: skip
    cols += [Col(f"type:{t}", t, fmt=pct) for t in types]
    cols += [Col("retained_tokens", "retained", fmt=lambda v: f"{v:.1f}"),
             Col("layer_avg_tokens", "n̄", fmt=lambda v: f"{v:.1f}"),
             Col("flops_exact", "LLM FLOPs/sample", fmt=si),
             Col("ms_min", "ms min", fmt=ms), Col("ms_med", "ms med", fmt=ms)]  # fmt: skip
    table = ResultTable(title, cols)
    for r in results:
        row = {
            "method": r["method"],
            "budget": _budget(r),
            "accuracy": r["accuracy"],
            "accuracy_ci95": r.get("accuracy_ci95"),
            "n": r["n"],
            **{f"type:{t}": r["per_type"].get(t) for t in types},
            "retained_tokens": r["retained_tokens"],
            "layer_avg_tokens": r["layer_avg_tokens"],
            "flops_exact": r["flops"]["exact"],
            "ms_min": _timing(r, "min"),
            "ms_med": _timing(r, "median"),
        }
        table.add(row, note=_realised_note(r))
    table.footer.append("95% CI: Wilson score interval of the accuracy.")
    if footer := _timing_footer(results):
        table.footer.append(footer)
    return table


def short_reason(message: str) -> str:
    """'... the smallest feasible budget is 385 ...' -> 'infeasible (min 385)'; else the first clause."""
    m = re.search(r"smallest feasible budget is (\d+)", message)
    return f"infeasible (min {m.group(1)})" if m else message.split(";")[0][:40]


def _realised_note(r: dict) -> str | None:
    """Why a row kept fewer tokens than its budget (e.g. pool's square grid): compare rows by n̄, not budget."""
    b = r.get("budget")
    if r["method"] == "none" or not isinstance(b, int) or "layer_avg_tokens" not in r:
        return None
    if r["layer_avg_tokens"] < b - 0.5:
        return (
            f"{r['method']} keeps n̄ = {r['layer_avg_tokens']:.1f} tokens at budget {b} (the count it can realise, "
            "e.g. a pooled h'×w' grid): compare it with other rows by n̄, not by budget."
        )
    return None


def compare_table(
    rows: list[dict], title: str = "", skipped: list | None = None, n_visual: int | None = None
) -> ResultTable:
    """Method × budget rows: accuracy with its 95 % interval, Δ vs the full model, n̄, FLOPs %, prefill ms per
    sample (min / median); cells that did not run and rows that kept fewer tokens than their budget get a
    numbered note under the table with the full reason."""
    full = next((r for r in rows if r["method"] == "none" and "accuracy" in r), None)
    cols = [
        Col("method", "method", "l"),
        Col("budget", "budget", fmt=budget),
        Col("accuracy", "acc %", fmt=pct),
        Col("accuracy_ci95", "95% CI", fmt=_ci),
        Col("delta", "Δ full", fmt=lambda v: f"{100 * v:+.1f}"),
        Col("layer_avg_tokens", "n̄", fmt=lambda v: f"{v:.1f}"),
        Col("flops_pct", "FLOPs %", fmt=lambda v: f"{v:.1f}"),
        Col("ms_min", "ms min", fmt=ms),
        Col("ms_med", "ms med", fmt=ms),
    ]
    seeds = any(r.get("seed_sd") is not None for r in rows)
    paired = any("p_vs_full" in r for r in rows)
    if seeds:
        cols.insert(4, Col("seed_sd", "± seeds", fmt=lambda v: f"{100 * v:.1f}"))
    if paired:
        cols[-2:-2] = [Col("p_vs_full", "p full", fmt=lambda v: f"{v:.3f}"),
                       Col("tied_best", "≈ best", fmt=lambda v: "yes" if v else "no")]  # fmt: skip
    table = ResultTable(title, cols)
    for r in rows:
        base = {"method": r["method"], "budget": _budget(r)}
        if "accuracy" not in r:
            reason = r.get("infeasible") or r.get("error") or "not run"
            kind = "not runnable" if "infeasible" in r else "failed"
            table.add(base, note=f"{r['method']} @ {budget(r['budget'])}: {kind}: {reason}")
            continue
        row = {
            **base,
            "accuracy": r["accuracy"],
            "accuracy_ci95": r.get("accuracy_ci95"),
            "delta": (r["accuracy"] - full["accuracy"]) if full else None,
            "layer_avg_tokens": r["layer_avg_tokens"],
            "flops_pct": 100 * r["flops"]["exact"] / full["flops"]["exact"] if full else None,
            "ms_min": _timing(r, "min"),
            "ms_med": _timing(r, "median"),
            "seed_sd": r.get("seed_sd"),
            "p_vs_full": r.get("p_vs_full"),
            "tied_best": r.get("tied_best"),
        }
        table.add(row, note=_realised_note(r))
    n = full["n"] if full else None
    table.footer.append(
        f"acc %: accuracy on {n} questions; 95% CI: its Wilson score interval; Δ full: accuracy minus the full "
        "model's, in points; n̄: layer-averaged visual tokens; FLOPs %: LLM prefill FLOPs (exact) of the full model's."
    )
    if seeds:
        per_seed = full.get("per_seed") if full else None
        table.footer.append(f"± seeds: standard deviation of the accuracy over the {len(per_seed or {}) or 'test'} "
                            "held-out test seeds (points).")
    if paired:
        from .significance import ALPHA, TEST_NAME

        table.footer.append(f"p full: {TEST_NAME} against the full model; ≈ best: not significantly worse than the "
                            f"best method at the same budget (p >= {ALPHA}, no multiple-comparison correction).")
    if footer := _timing_footer(rows):
        table.footer.append(footer)
    if skipped:
        table.footer.append(
            f"skipped budgets {', '.join(str(b) for b in skipped)}: >= N = {n_visual} visual tokens, every method is "
            "bypassed there (output identical to the full model, the 'none' row)."
        )
    return table
