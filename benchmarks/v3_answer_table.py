"""Per-answer accuracy and what was answered instead, from `vtprune testbed score --records` files.

    python benchmarks/v3_answer_table.py runs/scores/chain4-small.jsonl runs/scores/nm3-small.jsonl --type count

A count head can measure the count well while the answers pile up on a few digits (testbed docs, sixteenth
session: "3" and "5" never answered right, "2" and "4" answered twice as often as asked); the table shows that per
model: for each true answer, right / asked, then every answer given to those questions with how often.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def answer_table(records: list[dict], qtype: str) -> dict[str, Counter]:
    """{true answer: Counter of the predictions given to questions of `qtype` with that answer} (answers sorted,
    numbers by value)."""
    table: dict[str, Counter] = {}
    for r in records:
        if r["type"] == qtype:
            table.setdefault(r["answer"], Counter())[r["prediction"]] += 1
    return dict(sorted(table.items(), key=lambda kv: _order(kv[0])))


def _order(answer: str) -> tuple[bool, int, str]:
    """Numbers by value first, then words alphabetically."""
    return not answer.isdigit(), int(answer) if answer.isdigit() else 0, answer


def read_records(path: str | Path) -> list[dict]:
    """The JSON lines of one records file (one question each: id, type, answer, prediction, correct)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def format_table(table: dict[str, Counter]) -> list[str]:
    """One line per true answer: 'answer: right/asked  given: p1 n1, p2 n2, ...' (most often first), then how
    often each answer was given over all questions."""
    lines = []
    for answer, given in table.items():
        spread = ", ".join(f"{p} {n}" for p, n in given.most_common())
        lines.append(f"  {answer}: {given[answer]}/{sum(given.values())}  given: {spread}")
    total = sum(table.values(), Counter())
    lines.append("  answers given: " + ", ".join(f"{p} {total[p]}" for p in sorted(total, key=_order)))
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="+", help="records files of `vtprune testbed score --records`")
    ap.add_argument("--type", default="count", help="question type (default: count)")
    args = ap.parse_args(argv)
    for path in args.records:
        table = answer_table(read_records(path), args.type)
        if not table:
            raise SystemExit(f"{path}: no {args.type} questions (a records file of `vtprune testbed score`?)")
        print(path)
        print("\n".join(format_table(table)))


if __name__ == "__main__":
    main()
