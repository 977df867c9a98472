"""Per-type accuracy with 95 % Wilson intervals, and each model against the first, from score records.

    python benchmarks/v3_score_compare.py runs/scores/u7.jsonl runs/scores/chain6-tower.jsonl

Input: records files of `vtprune testbed score --records` (one JSON line per question: id, type, answer,
prediction, correct), all on the same questions. Output: one row per file (overall and per-type accuracy,
the overall interval), then for every file after the first the paired comparison with the first: questions
only it answers right / only the first answers right, and the two-sided exact McNemar p-value.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vtprune.eval.significance import bits_of, mcnemar_exact
from vtprune.files import read_jsonl
from vtprune.stats import wilson

#: The fields of a `vtprune testbed score --records` line these scripts read.
RECORD_FIELDS = {"id": (str,), "type": (str,), "correct": (bool,)}


def read_records(path: str | Path) -> dict[str, dict]:
    """{question id: record} of one records file."""
    return {r["id"]: r for r in read_jsonl(path, RECORD_FIELDS)}


def per_type(records: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """{'overall' and each question type: (right, asked)}."""
    out: dict[str, list[int]] = {"overall": [0, 0]}
    for r in records.values():
        for key in ("overall", r["type"]):
            cell = out.setdefault(key, [0, 0])
            cell[0] += bool(r["correct"])
            cell[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def paired(base: dict[str, dict], other: dict[str, dict]) -> tuple[int, int, float]:
    """(only `other` right, only `base` right, McNemar p) over the questions both answered."""
    ids = sorted(base)
    if set(ids) != set(other):
        raise SystemExit("the records files answer different questions; compare runs on the same split")
    a = bits_of(base[i]["correct"] for i in ids)
    b = bits_of(other[i]["correct"] for i in ids)
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b, strict=True))
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b, strict=True))
    return only_b, only_a, mcnemar_exact(a, b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="+", help="records files of `vtprune testbed score --records`")
    args = ap.parse_args(argv)
    runs = [(Path(p).stem, read_records(p)) for p in args.records]
    types = sorted({t for _, rec in runs for t in per_type(rec)} - {"overall"})
    print(f"{'model':<24} {'overall':>8} {'95% interval':>14} " + " ".join(f"{t:>9}" for t in types))
    for name, rec in runs:
        cells = per_type(rec)
        k, n = cells["overall"]
        lo, hi = wilson(k, n)
        row = " ".join(f"{cells[t][0] / cells[t][1]:>9.2f}" if t in cells else f"{'-':>9}" for t in types)
        print(f"{name:<24} {k / n:>8.3f} {f'{lo:.3f}-{hi:.3f}':>14} {row}")
    base_name, base = runs[0]
    for name, rec in runs[1:]:
        wins, losses, p = paired(base, rec)
        print(f"{name} vs {base_name}: right only here {wins}, only there {losses}, McNemar p = {p:.3g}")


if __name__ == "__main__":
    main()
