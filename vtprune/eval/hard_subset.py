"""Hard-subset report: a method's accuracy on the samples a plain downsampling baseline gets wrong vs right.

After "Are We Using the Right Benchmark" (Wen et al., 2025), which found that plain image downsampling at the
same token budget beats many pruning methods on common benchmarks: the samples the baseline already answers
correctly say little about a method; the ones it fails on ("hard") are where a pruning method must earn its
keep. `vtprune hard-subset RESULTS...` reads per-sample results of methods and of the `downsample` (or
`pool`) baseline, pairs each method with the baseline run at the same budget (and budget mode and task), and
reports on the samples both runs answered:

    n, accuracy of the method and of the baseline, and the method's accuracy on the baseline-wrong ("hard")
    and baseline-right ("easy") samples (with their counts), overall and per question type where known.

RESULTS are any mix of
- `vtprune eval --json` files (records with `id`, `type`, `correct`);
- lmms-eval samples (`*_samples_<task>.jsonl`, written with `--log_samples`), or an lmms-eval output
  directory (every samples file under it); method and budget come from the `vtprune` efficiency fields
  the `--model vtprune` plugin logs, the score from `--metric` (default: the first of exact_match, acc,
  accuracy, score; a dict value is read at its `score`), correct = score >= 0.5.

Samples are matched by id (a `vtprune eval` record's `id`; an lmms-eval document's `id` where the samples
keep their documents, as `simple_evaluate`'s in-memory ones do); where two results share no id (lmms-eval's
saved samples drop the document), by position: lmms-eval's `doc_id` is the document's index in the task's
data, a `vtprune eval` record's position its index in the `--data` file, so the two match when both ran on
the same exported file (`vtprune testbed export --lmms`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

BASELINES = ("downsample", "pool")
METRICS = ("exact_match", "acc", "accuracy", "score")
_NOT_METRICS = {
    "doc_id",
    "doc",
    "target",
    "arguments",
    "resps",
    "filtered_resps",
    "token_counts",
    "doc_hash",
    "input_media",
    "input",
    "prompt_hash",
    "target_hash",
}


@dataclass
class PerSample:
    """One run's per-sample correctness: key -> bool (and key -> question type where known)."""

    label: str
    method: str | None
    budget: object
    budget_mode: str | None
    task: str
    correct: dict[str, bool]
    types: dict[str, str] = field(default_factory=dict)
    #: key -> "#<position>" (lmms-eval's doc_id; a `vtprune eval` record's position in its data file)
    index: dict[str, str] = field(default_factory=dict)

    def by_index(self) -> PerSample:
        """The same results keyed by position (to match `vtprune eval` records with lmms-eval doc ids)."""
        return PerSample(
            self.label,
            self.method,
            self.budget,
            self.budget_mode,
            self.task,
            {self.index[k]: v for k, v in self.correct.items() if k in self.index},
            {self.index[k]: v for k, v in self.types.items() if k in self.index},
            {v: v for v in self.index.values()},
        )

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / max(len(self.correct), 1)


# --- reading results -------------------------------------------------------------------------------------
def _score(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        inner = value.get("score")
        return float(inner) if isinstance(inner, (int, float)) else None
    return None


def _metric_of(sample: dict, metric: str | None) -> float:
    if metric is not None:
        if metric not in sample:
            raise KeyError(f"metric {metric!r} not in the sample (keys: {sorted(sample)})")
        value = _score(sample[metric])
        if value is None:
            raise ValueError(f"metric {metric!r} is not a number (or a dict with a numeric 'score')")
        return value
    for name in METRICS:
        if name in sample and _score(sample[name]) is not None:
            return float(_score(sample[name]))
    for name, value in sample.items():  # e.g. pope_accuracy {"score": ...}
        if name not in _NOT_METRICS and not name.startswith("exact_match_") and _score(value) is not None:
            return float(_score(value))
    raise ValueError(f"no score in the sample (keys: {sorted(sample)}); pass --metric")


def _from_vtprune_eval(path: Path, data: dict) -> PerSample:
    correct = {str(r["id"]): bool(r["correct"]) for r in data["records"]}
    types = {str(r["id"]): str(r["type"]) for r in data["records"] if "type" in r}
    index = {str(r["id"]): f"#{i}" for i, r in enumerate(data["records"])}
    return PerSample(
        label=path.name,
        method=data.get("method"),
        budget=data.get("budget"),
        budget_mode=data.get("budget_mode"),
        task=data.get("benchmark", "shapes"),
        correct=correct,
        types=types,
        index=index,
    )


def _task_of_samples_file(path: Path) -> str:
    stem = path.stem  # <date>_samples_<task>
    return stem.split("_samples_", 1)[1] if "_samples_" in stem else stem


def _from_lmms_samples(path: Path, samples: list[dict], metric: str | None) -> PerSample:
    # lmms-eval's saved samples drop the document; in-memory ones (simple_evaluate) keep it
    ids = [(s.get("doc") or {}).get("id") for s in samples]
    use_id = all(i is not None for i in ids) and len({str(i) for i in ids}) == len(ids)
    correct, types, index = {}, {}, {}
    fields = {}
    for s, doc_key in zip(samples, ids, strict=True):
        key = str(doc_key) if use_id else f"#{s['doc_id']}"
        value = _metric_of(s, metric)
        correct[key] = value >= 0.5
        index[key] = f"#{s['doc_id']}"
        doc = s.get("doc") or {}
        if "type" in doc:
            types[key] = str(doc["type"])
        else:  # a per-type metric `<metric>_<type>` (e.g. exact_match_colour of vtprune_shapes)
            name = metric or next((m for m in METRICS if m in s), None)
            typed = [k[len(name) + 1 :] for k in s if name and k.startswith(f"{name}_") and "stderr" not in k]
            if len(typed) == 1:
                types[key] = typed[0]
        if not fields:
            for tc in s.get("token_counts") or []:
                if isinstance(tc, dict) and tc.get("vtprune"):
                    fields = tc["vtprune"]
                    break
    return PerSample(
        label=path.name,
        method=fields.get("method"),
        budget=fields.get("budget"),
        budget_mode=fields.get("budget_mode"),
        task=_task_of_samples_file(path),
        correct=correct,
        types=types,
        index=index,
    )


def load_results(path: str | Path, metric: str | None = None) -> list[PerSample]:
    """Per-sample results in a file (`vtprune eval --json`, lmms-eval samples JSONL) or an lmms-eval output
    directory (each samples file under it)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*samples*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no lmms-eval samples (*samples*.jsonl) under {path}")
        return [r for f in files for r in load_results(f, metric)]
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "records" in data:
        return [_from_vtprune_eval(path, data)]
    samples = [json.loads(line) for line in text.splitlines() if line.strip()] if data is None else [data]
    if not samples or "doc_id" not in samples[0]:
        raise ValueError(f"{path}: neither a `vtprune eval --json` result nor lmms-eval samples")
    return [_from_lmms_samples(path, samples, metric)]


# --- the report ------------------------------------------------------------------------------------------
def _acc(values: list[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def hard_subset(result: PerSample, baseline: PerSample) -> dict:
    """Accuracy of `result` on the samples `baseline` gets wrong (hard) vs right (easy), on shared samples.

    -> {method, baseline, task, budget, budget_mode, n, accuracy, baseline_accuracy, n_hard, hard_accuracy,
    n_easy, easy_accuracy, per_type {type: {n, accuracy, baseline_accuracy, n_hard, hard_accuracy, n_easy,
    easy_accuracy}}, only_in_result, only_in_baseline}.
    """
    keys = [k for k in result.correct if k in baseline.correct]
    matched_by = "id"
    if not keys:  # e.g. `vtprune eval` records vs saved lmms-eval samples: positions in the same data file
        result, baseline = result.by_index(), baseline.by_index()
        keys = [k for k in result.correct if k in baseline.correct]
        matched_by = "position"
    if not keys:
        raise ValueError(f"{result.label} and {baseline.label} share no samples")

    def block(ks: list[str]) -> dict:
        hard = [k for k in ks if not baseline.correct[k]]
        easy = [k for k in ks if baseline.correct[k]]
        return {
            "n": len(ks),
            "accuracy": _acc([result.correct[k] for k in ks]),
            "baseline_accuracy": _acc([baseline.correct[k] for k in ks]),
            "n_hard": len(hard),
            "hard_accuracy": _acc([result.correct[k] for k in hard]),
            "n_easy": len(easy),
            "easy_accuracy": _acc([result.correct[k] for k in easy]),
        }

    types = {**baseline.types, **result.types}
    by_type: dict[str, list[str]] = defaultdict(list)
    for k in keys:
        if k in types:
            by_type[types[k]].append(k)
    return {
        "method": result.method or result.label,
        "baseline": baseline.method or baseline.label,
        "result_file": result.label,
        "baseline_file": baseline.label,
        "task": result.task,
        "budget": result.budget,
        "budget_mode": result.budget_mode,
        **block(keys),
        "per_type": {t: block(ks) for t, ks in sorted(by_type.items())},
        "only_in_result": len(result.correct) - len(keys),
        "only_in_baseline": len(baseline.correct) - len(keys),
        "matched_by": matched_by,
    }


def _is_baseline(r: PerSample, baseline: str | None) -> bool:
    if baseline is not None:
        return r.method == baseline or r.label == Path(baseline).name
    return r.method in BASELINES


def hard_subset_report(results: list[PerSample], baseline: str | None = None) -> list[dict]:
    """Pair every non-baseline result with the baseline run of the same task and budget (and budget mode,
    where one matches). baseline: a method name or a results file name (default: `downsample`, else `pool`)."""
    bases = [r for r in results if _is_baseline(r, baseline)]
    if baseline is None and bases:
        for name in BASELINES:  # prefer downsample over pool
            named = [r for r in bases if r.method == name]
            if named:
                bases = named
                break
    others = [r for r in results if not any(r is b for b in bases)]
    if not bases:
        wanted = baseline or " or ".join(BASELINES)
        raise ValueError(f"no baseline ({wanted}) among the results: {[r.method or r.label for r in results]}")
    if not others:
        raise ValueError("only baseline results were given; add the method's results")
    rows = []
    for r in others:
        cands = [b for b in bases if b.budget is None or r.budget is None or b.budget == r.budget]
        if not cands:
            raise ValueError(
                f"no baseline at budget {r.budget} for {r.method or r.label} "
                f"(baselines at: {sorted({str(b.budget) for b in bases})})"
            )
        cands = [b for b in cands if b.task == r.task] or cands  # same task where there is one
        cands = [b for b in cands if b.budget_mode == r.budget_mode] or cands
        rows.append(hard_subset(r, cands[0]))
    return rows


def hard_subset_table(rows: list[dict], per_type: bool = False):
    """Rich table of `hard_subset_report` rows (overall; per question type too if `per_type`)."""
    from rich.table import Table

    bases = sorted({r["baseline"] for r in rows})
    t = Table(title=f"accuracy (%) on the samples {', '.join(bases)} gets wrong (hard) vs right (easy)")
    for col in ("task", "method", "budget", "type", "n", "acc", "baseline", "hard n", "hard", "easy n", "easy"):
        t.add_column(col, justify="left" if col in ("task", "method", "type") else "right")

    def pct(x: float) -> str:
        return "-" if x != x else f"{100 * x:.1f}"

    for row in rows:
        blocks = [("all", row)] + (list(row["per_type"].items()) if per_type else [])
        for name, b in blocks:
            t.add_row(
                row["task"],
                row["method"],
                str(row["budget"]),
                name,
                str(b["n"]),
                pct(b["accuracy"]),
                pct(b["baseline_accuracy"]),
                str(b["n_hard"]),
                pct(b["hard_accuracy"]),
                str(b["n_easy"]),
                pct(b["easy_accuracy"]),
            )
    return t
