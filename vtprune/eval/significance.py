"""Paired significance of accuracy differences: every cell of `compare` answers the same questions, so two
cells are compared by their per-question outcomes with the exact (binomial) McNemar test.

Rows carry `correct_bits` ("1"/"0" per question, in the order of the samples). `add_significance` adds to
every row that ran: `p_vs_full` (against the full model), `p_vs` ({other method at the same budget: p}),
`best_at_budget` and `tied_best` (not significantly worse than the best method at its budget), with
`ALPHA` = 0.05 and no correction for multiple comparisons (stated in the table captions).
"""

from __future__ import annotations

import math

from vtprune.errors import VtpruneError

ALPHA = 0.05
TEST_NAME = "two-sided exact McNemar test on the paired per-question outcomes"


def bits_of(correct) -> str:
    """Per-question outcomes (bools) -> "1"/"0" string (compact in JSON)."""
    return "".join("1" if c else "0" for c in correct)


def mcnemar_exact(a: str, b: str) -> float:
    """Two-sided exact McNemar p-value of two paired outcome strings ("1" right, "0" wrong, same questions):
    with n01 / n10 the discordant counts, p = min(1, 2 · P[Bin(n01 + n10, 1/2) <= min(n01, n10)]); 1.0 when
    nothing is discordant."""
    if len(a) != len(b):
        raise VtpruneError(f"McNemar needs outcomes of the same questions: {len(a)} vs {len(b)}")
    if not a or set(a + b) - {"0", "1"}:
        raise VtpruneError("McNemar needs non-empty outcome strings of '0' / '1'")
    ia, ib = int(a, 2), int(b, 2)  # the outcome strings as bit sets: discordant counts by popcount
    n10, n01 = (ia & ~ib).bit_count(), (ib & ~ia).bit_count()
    n = n10 + n01
    if n == 0:
        return 1.0
    k = min(n10, n01)
    tail = sum(math.comb(n, i) for i in range(k + 1))  # exact integers, then one division
    return min(1.0, 2.0 * tail / 2**n)


def add_significance(rows: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Annotate the rows that ran and carry `correct_bits` in place (see the module docstring); -> rows."""
    ran = [r for r in rows if "accuracy" in r and r.get("correct_bits")]
    full = next((r for r in ran if r["method"] == "none"), None)
    by_budget: dict[str, list[dict]] = {}
    for r in ran:
        if r["method"] == "none":
            continue
        if full is not None and len(full["correct_bits"]) == len(r["correct_bits"]):
            r["p_vs_full"] = mcnemar_exact(r["correct_bits"], full["correct_bits"])
        by_budget.setdefault(str(r["budget"]), []).append(r)
    for group in by_budget.values():
        best = max(group, key=lambda r: r["accuracy"])
        for r in group:
            r["p_vs"] = {o["method"]: mcnemar_exact(r["correct_bits"], o["correct_bits"])
                         for o in group if o is not r and len(o["correct_bits"]) == len(r["correct_bits"])}
            r["best_at_budget"] = best["method"]
            r["tied_best"] = r is best or r["accuracy"] == best["accuracy"] or r["p_vs"].get(best["method"], 0) >= alpha
    return rows


def same_as_full(row: dict, alpha: float = ALPHA) -> bool:
    """Whether a row's accuracy is not significantly different from the full model's (False when untested)."""
    return row.get("p_vs_full") is not None and row["p_vs_full"] >= alpha
