"""Validity of the built-in benchmark: does it rank methods as LLaVA-1.5-7B does in the papers?

`vtprune/assets/published/llava15_7b_relative.json` holds the published accuracies of the methods relative to
the unpruned LLaVA-1.5-7B (% of full, averaged over a protocol's benchmarks) at 64 and 128 tokens, each with
its protocol and its source line in `/work/shared/spec/`. Numbers are only compared within one protocol.
`rank_correlation` gives the Spearman ρ between a testbed ranking (any score per method, e.g. held-out
accuracy at the same budget) and the published one, over the methods both have.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from vtprune.errors import VtpruneError

PUBLISHED = Path(__file__).resolve().parent.parent / "assets" / "published" / "llava15_7b_relative.json"


@lru_cache(maxsize=1)
def _load() -> dict:
    return json.loads(PUBLISHED.read_text())


def published_entries() -> list[dict]:
    """Every entry: {method, budget, relative (% of full), protocol, source}."""
    return [dict(e) for e in _load()["entries"]]


def protocols() -> dict[str, str]:
    """Protocol name -> description."""
    return dict(_load()["protocols"])


def published_scores(budget: int, protocol: str | None = None) -> dict[str, float]:
    """{method: relative accuracy %} at `budget` tokens under one protocol (default: the data file's default,
    the RESTORE unified re-run, which has the most methods measured by one harness)."""
    protocol = protocol or _load()["default_protocol"]
    if protocol not in protocols():
        raise VtpruneError(f"unknown protocol {protocol!r} (accepted: {', '.join(protocols())})")
    out = {e["method"]: float(e["relative"]) for e in _load()["entries"]
           if e["budget"] == budget and e["protocol"] == protocol}
    if not out:
        budgets = sorted({e["budget"] for e in _load()["entries"] if e["protocol"] == protocol})
        raise VtpruneError(f"no published numbers at {budget} tokens under {protocol!r} (budgets there: {budgets})")
    return out


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values` (n,), ties sharing their average rank (vectorised)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_v = values[order]
    ranks_sorted = np.arange(1, len(values) + 1, dtype=np.float64)
    # mean rank of each run of equal values
    starts = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
    group = np.cumsum(starts) - 1
    sums = np.bincount(group, weights=ranks_sorted)
    counts = np.bincount(group)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = (sums / counts)[group]
    return ranks


def spearman_rho(a: dict[str, float], b: dict[str, float]) -> tuple[float, list[str]]:
    """Spearman's ρ (Pearson correlation of average ranks) over the keys both dicts have -> (ρ, methods).
    Needs >= 3 common methods; ρ is NaN when either side is constant."""
    common = sorted(set(a) & set(b))
    if len(common) < 3:
        raise VtpruneError(f"Spearman's rho needs at least 3 methods in both rankings, got {common}")
    ra = average_ranks(np.asarray([a[m] for m in common]))
    rb = average_ranks(np.asarray([b[m] for m in common]))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return (float((ra * rb).sum() / denom) if denom > 0 else float("nan")), common


def rank_correlation(testbed: dict[str, float], budget: int, protocol: str | None = None) -> dict:
    """Spearman ρ between testbed scores per method (e.g. held-out accuracy at `budget`) and the published
    relative accuracies at `budget` -> {rho, n, methods, protocol, budget, published}."""
    pub = published_scores(budget, protocol)
    rho, methods = spearman_rho(testbed, pub)
    return {"rho": rho, "n": len(methods), "methods": methods, "budget": budget,
            "protocol": protocol or _load()["default_protocol"], "published": {m: pub[m] for m in methods}}
