"""`run_eval`: accuracy of one (method, budget) on the built-in shapes benchmark, with token counts,
analytic FLOPs and measured LLM prefill time per sample."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

import vtprune
from vtprune.errors import VtpruneError
from vtprune.measurement.flops import prefill_flops_all
from vtprune.measurement.timing import PrefillTimer
from vtprune.models import adapter_for
from vtprune.results import EvalResult
from vtprune.testbed import balanced_samples, evaluate
from vtprune.testbed.data import HELDOUT_SEED


def load_samples(n: int | None = None, seed: int = HELDOUT_SEED, data: str | Path | None = None):
    """Held-out samples: an exported JSONL (`data`) or generated, `n` per question type.  -> (samples, root)."""
    if data is not None:
        return read_samples(data, n)
    return balanced_samples(seed, n or 50), None


def load_benchmark_samples(benchmark: str, n: int | None = None, seed: int | None = None,
                           data: str | Path | None = None, test_seeds=None) -> tuple[list[dict], Path | None]:
    """The questions `eval` / `compare` score on `benchmark` (`benchmark.benchmark_of(processor)`): an exported
    JSONL (`data`, `n` in total), else generated: v3, the held-out test split, `n` per type (default
    `V3_N_PER_TYPE`) for each of `test_seeds` (default 30000 / 30001 / 30002); v2, the held-out seed `seed`
    (default 10002), `n` per type (default 50).  -> (samples, image root or None)."""
    from .benchmark import V2_N_PER_TYPE, V3, V3_N_PER_TYPE, v3_test_samples

    if data is not None:
        return read_samples(data, n)
    if benchmark == V3:
        return v3_test_samples(n or V3_N_PER_TYPE, test_seeds), None
    return balanced_samples(HELDOUT_SEED if seed is None else seed, n or V2_N_PER_TYPE), None


def read_samples(data: str | Path, n: int | None = None) -> tuple[list[dict], Path]:
    """An exported JSONL (`vtprune testbed export`): every row checked (strict JSON object with string id,
    image, question, answer, type; the image exists and has a readable header of bounded size), the first `n`
    kept.  Problems raise `VtpruneError` "FILE:LINE: ..."; an empty file is refused.  -> (samples, image root)."""
    from vtprune.files import check_image, read_jsonl

    path = Path(data)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise VtpruneError(f"the number of samples must be an int >= 1 (0 or None: all), got {n!r}")
    fields = {k: (str,) for k in ("image", "question", "answer", "type")}
    rows = read_jsonl(path, {"id": (str, int), **fields})
    rows = rows[:n] if n else rows
    for row in rows:
        line = row.pop("_line")
        check_image(path.parent / row["image"], f"{path}:{line}")
    return rows, path.parent


def run_eval(
    model,
    processor,
    samples,
    method: str = "none",
    budget: int | float = 576,
    *,
    budget_mode: str = "layer_avg",
    positions: str = "keep",
    options: dict | None = None,
    batch_size: int = 16,
    image_root=None,
    progress: bool = False,
    answers: list[str] | None = None,
) -> EvalResult:
    """Evaluate `method` at `budget` on `samples` (`answers`: the words the prediction is restricted to; default
    those of the benchmark the model's processor speaks, `benchmark.benchmark_of`).

    -> {method, budget, accuracy, per_type, n, retained_tokens, layer_avg_tokens, flops (mean per sample,
    three conventions), prefill_ms (median LLM prefill per batch), records (per sample, with its counts)}.
    """
    from .benchmark import answer_words, benchmark_of

    options = options or {}
    answers = list(answers) if answers is not None else answer_words(benchmark_of(processor))
    per_sample: list[dict] = []
    dims = None

    def on_batch(batch_records: list[dict]) -> None:
        nonlocal dims
        rec = vtprune.last_run(model)
        dims = rec.dims
        for r, s in zip(batch_records, rec.samples, strict=True):
            r.update(
                n_visual=s.n_visual,
                retained_tokens=s.retained_tokens,
                layer_avg_tokens=s.layer_avg_tokens,
                flops=prefill_flops_all(s.visual_per_layer, s.n_text, rec.dims),
            )
            per_sample.append(r)

    vtprune.apply(model, method, budget, budget_mode=budget_mode, positions=positions, **options)
    try:
        with PrefillTimer(adapter_for(model).language_model) as timer:
            result = evaluate(
                model,
                processor,
                samples,
                batch_size=batch_size,
                image_root=image_root,
                progress=progress,
                on_batch=on_batch,
                answers=answers,
            )
    finally:
        vtprune.remove(model)
    n = max(len(per_sample), 1)
    return {
        "method": method,
        "budget": budget,
        "budget_mode": budget_mode,
        "options": options,
        "accuracy": result["accuracy"],
        "per_type": result["per_type"],
        "n": result["n"],
        "retained_tokens": sum(r["retained_tokens"] for r in per_sample) / n,
        "layer_avg_tokens": sum(r["layer_avg_tokens"] for r in per_sample) / n,
        "flops": {k: sum(r["flops"][k] for r in per_sample) / n for k in ("fastv", "swiglu", "exact")},
        "prefill_ms": statistics.median(timer.ms) if timer.ms else None,  # None, not NaN: strict JSON
        "batch_size": batch_size,
        "records": per_sample,
    }


def load_model(name_or_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """`builtin:NAME` or a directory -> (model, processor) through the one loader (`vtprune.loading.load`)."""
    from vtprune.loading import load

    loaded = load(name_or_path, device=device, dtype=dtype)
    if loaded.processor is None:
        raise VtpruneError(f"{name_or_path}: no processor to build the benchmark's inputs (a LLaVA-1.5 checkpoint "
                           "saved with its processor is expected)")
    return loaded.model, loaded.processor
