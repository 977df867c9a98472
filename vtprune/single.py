"""One image + one prompt through a (pruned) model -> answer, token counts, FLOPs, timing (`run_one`): what
`vtprune run` prints and what `vtprune show` draws, one method at a time.

Timings are one call (no warm-up, no repeats): ``prefill_ms`` is the language model's prefill (decoder
layers, in-LLM selection included; vision tower and pre-LLM selection excluded), ``total_ms`` the whole
``generate``. For robust timings use ``vtprune bench``. Which kept tokens carry *merged* features comes from
the run record (`PruningEvent.merged_idx`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image

import vtprune
from vtprune.loading import Loaded, build_inputs, suppressed_ids
from vtprune.measurement.flops import prefill_flops_all
from vtprune.measurement.timing import PrefillTimer
from vtprune.results import RunResult


def run_one(
    loaded: Loaded,
    image: Image.Image | str | Path,
    prompt: str,
    method: str = "none",
    budget: int | float = 64,
    *,
    budget_mode: str = "layer_avg",
    positions: str = "keep",
    options: dict | None = None,
    max_new_tokens: int = 16,
    inputs: dict | None = None,
    keep_patched: bool = False,
) -> RunResult:
    """Generate an answer with `method` at `budget`.

    -> {answer, method, budget, n_visual, n_text, retained_tokens, layer_avg_tokens, visual_per_layer,
    flops / flops_unpruned ({fastv, swiglu, exact}: analytic LLM prefill FLOPs), prefill_ms (LLM prefill),
    total_ms (whole `generate`), new_tokens, events [{stage, keep_idx (K,), merged, merged_idx}],
    record (the `RunRecord`), note}. `events[i].merged_idx`: the kept indices whose features are merges
    (the record's `PruningEvent.merged_idx`: where a plan's `new_feats` differ from the candidates' own features).
    keep_patched: leave the method attached (so `vtprune.last_run(model)` still answers).
    """
    model = loaded.model
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    if inputs is None:
        inputs = build_inputs(loaded, image, prompt)
    options = dict(options or {})
    vtprune.apply(
        model, method, budget, budget_mode=budget_mode, positions=positions, tokenizer=loaded.tokenizer, **options
    )
    try:
        gen_kw = {"max_new_tokens": max_new_tokens, "do_sample": False, "suppress_tokens": suppressed_ids(model.config)}
        with torch.inference_mode(), PrefillTimer(loaded.language_model) as timer:
            t0 = time.perf_counter()
            out = model.generate(**inputs, **gen_kw)
            if out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
            total_ms = (time.perf_counter() - t0) * 1e3
        record = vtprune.last_run(model)
    finally:
        if not keep_patched:
            vtprune.remove(model)
    new = out[0, inputs["input_ids"].shape[1] :]
    answer = loaded.tokenizer.decode(new.tolist(), skip_special_tokens=True).strip()
    sample = record.samples[0]
    dims = record.dims
    events = [
        {"stage": ev.stage, "keep_idx": ev.keep_idx, "merged": bool(ev.merged), "merged_idx": ev.merged_idx.tolist()}
        for ev in sample.events
    ]
    return {
        "answer": answer,
        "method": method,
        "budget": budget,
        "budget_mode": budget_mode,
        "options": options,
        "n_visual": sample.n_visual,
        "n_text": sample.n_text,
        "retained_tokens": sample.retained_tokens,
        "layer_avg_tokens": sample.layer_avg_tokens,
        "visual_per_layer": list(sample.visual_per_layer),
        "flops": prefill_flops_all(sample.visual_per_layer, sample.n_text, dims),
        "flops_unpruned": prefill_flops_all([sample.n_visual] * dims.num_layers, sample.n_text, dims),
        "prefill_ms": timer.ms[0] if timer.ms else float("nan"),
        "total_ms": total_ms,
        "new_tokens": int(new.numel()),
        "events": events,
        "record": record,
        "note": loaded.note,
    }
