"""Which count questions a v3 model gets wrong: by what is counted, how many, how small, and how crowded.

    python benchmarks/v3_count_breakdown.py runs/scores/u7.jsonl --split calibration:20001 --per-type 100

Input: a records file of `vtprune testbed score --split SPLIT --per-type N --records FILE`; the same split and N
regenerate the same questions (`data_v3.balanced_samples`), whose scene graphs give each count question its
counted attribute (colour or shape), its answer k, the side of the smallest counted object (in patches of 14 px)
and the number of objects in the scene. Output: accuracy with its 95 % Wilson interval per group of each of the
four. No model is run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from vtprune.files import read_jsonl
from vtprune.stats import wilson
from vtprune.testbed.data_v3 import balanced_samples
from vtprune.testbed.questions import PLURAL
from vtprune.testbed.questions_v3 import COUNT_CHANNELS
from vtprune.testbed.scenes import COLOURS
from vtprune.testbed.scenes_v3 import Scene3
from vtprune.testbed.splits import parse_split

PATCH = 14.0
COLOURS_FIRST = len(COLOURS)  # COUNT_CHANNELS: the colours, then the shapes


def counted(scene: Scene3, question: str) -> list:
    """The objects a count question counts (its channel: a colour, then a shape)."""
    word = question.split()[2]  # "how many red objects are there ?" / "how many circles are there ?"
    if COUNT_CHANNELS[question] < COLOURS_FIRST:
        return [o for o in scene.objects if o.colour == word]
    return [o for o in scene.objects if PLURAL[o.shape] == word]


def features(sample: dict) -> dict[str, str]:
    """{grouping: group} of one count sample."""
    scene, question = sample["scene"], sample["question"]
    objs = counted(scene, question)
    smallest = min((o.size for o in objs), default=None)
    size = "none counted" if smallest is None else (
        "< 1 patch" if smallest < PATCH else "1-2 patches" if smallest < 2 * PATCH else ">= 2 patches")
    n = len(scene.objects)
    return {
        "counted attribute": "colour" if COUNT_CHANNELS[question] < COLOURS_FIRST else "shape",
        "answer k": sample["answer"],
        "smallest counted object": size,
        "objects in the scene": "3-5" if n <= 5 else "6-8" if n <= 8 else "9-11" if n <= 11 else "12-14",
    }


def breakdown(records: list[dict], samples: list[dict]) -> dict[str, dict[str, tuple[int, int]]]:
    """{grouping: {group: (right, asked)}} over the count records (joined with the samples by id)."""
    by_id = {s["id"]: s for s in samples}
    out: dict[str, dict[str, list[int]]] = {}
    for r in records:
        if r["type"] != "count":
            continue
        if r["id"] not in by_id:
            raise SystemExit(f"record {r['id']} is not among the regenerated questions: pass the scoring run's "
                             "--split and --per-type")
        for grouping, group in features(by_id[r["id"]]).items():
            cell = out.setdefault(grouping, {}).setdefault(group, [0, 0])
            cell[0] += bool(r["correct"])
            cell[1] += 1
    return {g: {k: (v[0], v[1]) for k, v in sorted(groups.items(), key=_order)} for g, groups in out.items()}


GROUP_ORDER = ("none counted", "< 1 patch", "1-2 patches", ">= 2 patches", "3-5", "6-8", "9-11", "12-14")


def _order(item: tuple[str, list[int]]) -> tuple:
    """Counts by value, the size and crowding groups small to large, the rest alphabetically."""
    key = item[0]
    if key.isdigit():
        return 0, int(key), key
    return (1, GROUP_ORDER.index(key), key) if key in GROUP_ORDER else (2, 0, key)


def format_breakdown(table: dict[str, dict[str, tuple[int, int]]], interval: Callable = wilson) -> list[str]:
    """One heading per grouping, then one line per group: right/asked, accuracy and its interval."""
    lines = []
    for grouping, groups in table.items():
        lines.append(f"{grouping}:")
        for group, (k, n) in groups.items():
            lo, hi = interval(k, n)
            lines.append(f"  {group:<14} {k:>3}/{n:<3} {k / n:.2f} ({lo:.2f}-{hi:.2f})")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", help="records file of `vtprune testbed score --records`")
    ap.add_argument("--split", default="calibration:20001", help="the scoring run's --split")
    ap.add_argument("--per-type", type=int, default=100, help="the scoring run's --per-type")
    args = ap.parse_args(argv)
    records = read_jsonl(args.records, {"id": (str,), "type": (str,), "correct": (bool,)})
    samples = balanced_samples(parse_split(args.split), args.per_type)
    print("\n".join(format_breakdown(breakdown(records, samples))))


if __name__ == "__main__":
    main()
