"""Render `vtprune bench --json` files as one markdown table (the tables of BENCHMARKS.md).

    python benchmarks/bench_markdown.py runs/l2_pool.json runs/l2_random.json ... [--goal 0.9 --select-goal 2]

Each file's unpruned row is printed once per file (its own interleaved baseline), followed by the method rows;
a `!` marks a speed-up below `goal` × the FLOPs bound, a selection share above `select-goal` % or a pruned
prefill above `stock-goal` × the stock model at the same per-layer lengths (`÷ stock`, min of the rounds;
`stock % of bound` = the stock model's own speed-up at those lengths ÷ the FLOPs bound). The full-depth
selection share divides the selection time by the pruned prefill scaled to the model's full depth with the
analytic FLOPs (`exact` convention), an estimate for runs truncated with `--layers`.
"""

from __future__ import annotations

import argparse
import json

COLUMNS = (
    "method | budget | mode | K | n̄ | prefill ms | unpruned ms | speed-up | FLOPs bound | % of bound | ÷ stock "
    "| stock % of bound | select ms | select % | select % @full depth (est.) | decode ms/tok | KV MiB"
)


def _ratio(v, goal: float) -> str:
    return "–" if v is None else f"{v:.3f}" + (" !" if v > goal else "")


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}"


def rows_of(path: str, goal: float, select_goal: float, stock_goal: float = 1.03) -> list[str]:
    with open(path) as f:
        data = json.load(f)
    mode = data["config"].get("budget_mode", "layer_avg")
    out = []
    for r in data["rows"]:
        if r.get("error"):
            out.append(f"| {r['method']} | {r['budget']} | {mode} | – | – | infeasible: {r['error'][:90]} |"
                       + " |" * 11)
            continue
        pct = 100 * r["speedup_prefill"] / r["flops_bound"]
        sel_pct = r.get("selection_pct_of_prefill", 0.0)
        slow = " !" if r["budget"] != "all" and pct < 100 * goal else ""
        costly = " !" if sel_pct > select_goal else ""
        # the pruned prefill at the model's full depth, scaled by analytic FLOPs (a truncated `--layers` run)
        exact = r["flops"]["exact"]
        full_ms = r["prefill_ms"] * r.get("flops_full_depth", {}).get("exact", exact) / exact
        sel_full = 100 * r["selection_ms"] / full_ms if full_ms else 0.0
        costly_full = " !" if sel_full > select_goal else ""
        out.append(
            f"| {r['method']} | {r['budget']} | {mode} | {r['retained_tokens']:.0f} | {r['layer_avg_tokens']:.1f} "
            f"| {r['prefill_ms']:.0f} | {r['prefill_ms_unpruned']:.0f} | {r['speedup_prefill']:.2f}× "
            f"| {r['flops_bound']:.2f}× | {pct:.0f}{slow} | {_ratio(r.get('vs_stock'), stock_goal)} "
            f"| {_pct(r.get('stock_vs_bound'))} | {r['selection_ms']:.1f} | {sel_pct:.2f}{costly} "
            f"| {sel_full:.2f}{costly_full} "
            f"| {r['decode_ms_per_token']:.0f} | {r['kv_bytes'] / 2**20:.1f} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--goal", type=float, default=0.9, help="fraction of the FLOPs bound to reach")
    ap.add_argument("--select-goal", type=float, default=2.0, help="selection share of the pruned prefill, %%")
    ap.add_argument("--stock-goal", type=float, default=1.03, help="pruned prefill ÷ stock at the same lengths")
    args = ap.parse_args()
    print("| " + COLUMNS + " |")
    print("|" + "---|" * len(COLUMNS.split("|")))
    for path in args.files:
        for line in rows_of(path, args.goal, args.select_goal, args.stock_goal):
            print(line)


if __name__ == "__main__":
    main()
