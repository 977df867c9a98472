"""Typed results of the applications: `run_one` (one image), `run_eval` (one method × budget on the built-in
benchmark) and a `vtprune bench` row. They are plain dicts at run time (JSON as before); these types name every
key for readers and type checkers."""

from __future__ import annotations

from typing import Any, TypedDict

#: analytic LLM prefill FLOPs per convention: {"fastv", "swiglu", "exact"} -> FLOPs
Flops = dict[str, float]


class EventRow(TypedDict):
    """One pruning event of a sample: its stage, kept candidate indices (K,), whether and where features merge."""

    stage: str
    keep_idx: Any  # torch.Tensor (K,)
    merged: bool
    merged_idx: list[int]


class RunResult(TypedDict):
    """`vtprune.single.run_one`: one generated answer with its token counts, FLOPs and times."""

    answer: str
    method: str
    budget: int | float
    budget_mode: str
    options: dict[str, Any]
    n_visual: int
    n_text: int
    retained_tokens: int
    layer_avg_tokens: float
    visual_per_layer: list[int]
    flops: Flops
    flops_unpruned: Flops
    prefill_ms: float  # LLM prefill (NaN when not measured)
    total_ms: float  # the whole `generate`
    new_tokens: int
    events: list[EventRow]
    record: Any  # vtprune.record.RunRecord
    note: str | None


class EvalResult(TypedDict):
    """`vtprune.eval.shapes.run_eval`: accuracy of one method × budget and its per-sample mean costs."""

    method: str
    budget: int | float
    budget_mode: str
    options: dict[str, Any]
    accuracy: float
    per_type: dict[str, float]
    n: int
    retained_tokens: float
    layer_avg_tokens: float
    flops: Flops
    prefill_ms: float | None  # median LLM prefill per batch; None (not NaN) keeps JSON strict
    batch_size: int
    records: list[dict[str, Any]]


class BenchRow(TypedDict, total=False):
    """One `vtprune bench` row (method × budget): a failed cell has only method, budget, error and the run's
    device / dtype / attn / batch; a measured one has the rest (times are medians over the timed repeats)."""

    method: str
    budget: int | float | str  # "all" for the unpruned model
    error: str
    device: str
    dtype: str
    attn: str
    batch: int
    n_visual: float
    n_text: float
    retained_tokens: float
    layer_avg_tokens: float
    visual_per_layer: list[int]
    flops: Flops
    flops_full_depth: Flops
    layers: int
    layers_full: int
    kv_bytes: float
    kv_bytes_analytic: float
    peak_mem_bytes: float
    peak_mem_source: str
    repeats: int
    prefill_ms: float | None
    prefill_ms_min: float | None
    prefill_ms_unpruned: float | None
    e2e_ms: float | None
    forward_prefill_ms: float | None
    decode_ms_per_token: float | None
    selection_ms: float | None
    selection_pct_of_prefill: float
    speedup_prefill: float | None
    flops_bound: float
    flops_bound_fastv: float
    flops_bound_swiglu: float
    flops_bound_full_depth: float
    speedup_vs_bound: float
    stock_equiv_ms: float
    stock_equiv_ms_min: float
    vs_stock: float
    stock_speedup: float
    stock_vs_bound: float
