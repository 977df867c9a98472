"""Efficiency of an lmms-eval run of `--model vtprune`: per-sample fields and their aggregate.

Per sample (one per document and request type; logged by lmms-eval with `--log_samples` as
`token_counts[i]["vtprune"]`):

    {method, budget, budget_mode, visual_tokens, text_tokens, retained_tokens, layer_avg_tokens,
     flops {exact, fastv, swiglu}, flops_unpruned {…}, prefill_ms (LLM prefill of the sample's batch),
     batch_size}

`summarize_efficiency(records)` -> {samples, visual_tokens, retained_tokens, layer_avg_tokens (means),
flops / flops_unpruned (mean per sample, three conventions), flops_ratio (exact, pruned / unpruned),
prefill_ms_per_sample (mean of batch prefill / batch size), prefill_ms_batch_median}.
`summarize_by_task(records)` gives it overall and per task; `summary_metrics(...)` flattens either to
`vtprune_*` numbers (what the plugin logs into the results file's `throughput` section, where lmms-eval
prefixes them with `avg_`); `efficiency_of_samples(samples)` reads the fields back from lmms-eval's samples.
No lmms_eval import here.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

CONVENTIONS = ("exact", "fastv", "swiglu")


def summarize_efficiency(records: list[dict]) -> dict:
    """Means over per-sample efficiency fields (records without fields are skipped)."""
    rows = [r for r in records if r and "retained_tokens" in r]
    n = len(rows)
    if n == 0:
        return {"samples": 0}

    def mean(key):
        return sum(float(r[key]) for r in rows) / n

    flops = {c: sum(float(r["flops"][c]) for r in rows) / n for c in CONVENTIONS}
    unpruned = {c: sum(float(r["flops_unpruned"][c]) for r in rows) / n for c in CONVENTIONS}
    batch_ms = [float(r["prefill_ms"]) for r in rows if r.get("prefill_ms") == r.get("prefill_ms")]
    per_sample = [float(r["prefill_ms"]) / max(int(r.get("batch_size") or 1), 1) for r in rows]
    return {
        "samples": n,
        "method": rows[0].get("method"),
        "budget": rows[0].get("budget"),
        "budget_mode": rows[0].get("budget_mode"),
        "visual_tokens": mean("visual_tokens"),
        "text_tokens": mean("text_tokens"),
        "retained_tokens": mean("retained_tokens"),
        "layer_avg_tokens": mean("layer_avg_tokens"),
        "flops": flops,
        "flops_unpruned": unpruned,
        "flops_ratio": flops["exact"] / unpruned["exact"] if unpruned["exact"] else float("nan"),
        "prefill_ms_per_sample": sum(per_sample) / n,
        "prefill_ms_batch_median": statistics.median(batch_ms) if batch_ms else float("nan"),
    }


def summarize_by_task(records: list[dict]) -> dict:
    """{"overall": summary, "by_task": {task: summary}} of records carrying a `task` key."""
    tasks: dict[str, list[dict]] = {}
    for r in records:
        tasks.setdefault(str(r.get("task")), []).append(r)
    return {
        "overall": summarize_efficiency(records),
        "by_task": {t: summarize_efficiency(rs) for t, rs in tasks.items()},
    }


PER_TASK_KEYS = (
    "samples",
    "retained_tokens",
    "layer_avg_tokens",
    "flops_exact",
    "flops_ratio",
    "prefill_ms_per_sample",
)


def summary_metrics(summary: dict, prefix: str = "vtprune_") -> dict[str, float]:
    """The numbers of a summary as flat `vtprune_*` keys (nested FLOPs as `vtprune_flops_<convention>`).

    A `summarize_by_task` result: the overall numbers, then `vtprune_<task>_<key>` for the main keys of each
    task (PER_TASK_KEYS)."""
    if "overall" in summary and "by_task" in summary:
        out = summary_metrics(summary["overall"], prefix)
        for task, s in summary["by_task"].items():
            flat = summary_metrics(s, "")
            out.update({f"{prefix}{task}_{k}": flat[k] for k in PER_TASK_KEYS if k in flat})
        return out
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{prefix}{key}_{sub}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def efficiency_of_samples(samples: list[dict]) -> list[dict]:
    """Per-sample fields from lmms-eval's logged samples (the first request's `token_counts` entry)."""
    out = []
    for s in samples:
        for tc in s.get("token_counts") or []:
            if isinstance(tc, dict) and tc.get("vtprune"):
                out.append({"doc_id": s.get("doc_id"), **tc["vtprune"]})
                break
    return out


def read_samples(path: str | Path) -> list[dict]:
    """lmms-eval samples in document order: a `*_samples_*.jsonl` file, or the first one under a directory.

    (lmms-eval 0.7.3 shards documents round-robin over processes and writes the gathered samples rank by
    rank: 0, 2, 4, …, 1, 3, …; sorting by `doc_id` restores the order of a one-process run.)"""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob("*samples*.jsonl"))
        if not found:
            raise FileNotFoundError(f"no lmms-eval samples (*samples*.jsonl) under {path}")
        path = found[0]
    with open(path) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    return sorted(samples, key=lambda s: s.get("doc_id", 0))
