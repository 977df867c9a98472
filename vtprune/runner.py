"""`vtprune run`: one image + one prompt through a (pruned) model -> answer, token counts, FLOPs, timing.

    loaded = load("builtin:shapes-llava")                     # or a local directory, "arch:llava-1.5-7b", ...
    result = run_one(loaded, Image.open("cat.png"), "What is shown?", "fastv", 64)
    result["answer"], result["retained_tokens"], result["flops"]["exact"], result["prefill_ms"]

Models come from `vtprune.loading.load` (``builtin:NAME``, ``arch:NAME``, ``tiny:KIND``, a local directory, a
hub id); `Loaded`, `load`, `wrap`, `prompt_text` and `build_inputs` are re-exported from there. ``arch:`` /
``tiny:`` models have random weights and a placeholder tokenizer: the answer is noise; the token counts, FLOPs
and timings are real. ``Loaded.note`` says so.

`run_one` (one method on one image + prompt) lives in `vtprune.single`; `result_table` is its rich table.

The prompt is wrapped in the family's chat template when the processor (or tokenizer) has one, else in the
adapter's default (``USER: <image>\\n{prompt} ASSISTANT:`` for LLaVA, ``<|vision_start|><|image_pad|>
<|vision_end|> {prompt}`` for Qwen2.5-VL).
"""

from __future__ import annotations

from vtprune.loading import Loaded, build_inputs, load, prompt_text, wrap
from vtprune.single import run_one

__all__ = ["Loaded", "build_inputs", "load", "prompt_text", "result_table", "run_one", "wrap"]


# --- CLI glue -----------------------------------------------------------------------------------------
def result_table(result: dict, title: str = ""):
    """Rich table: tokens, FLOPs (pruned / unpruned, three conventions), times."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("", justify="left")
    t.add_column("value", justify="right")
    t.add_row("visual tokens (N)", str(result["n_visual"]))
    t.add_row("text tokens", str(result["n_text"]))
    t.add_row("retained (entering layer 0)", str(result["retained_tokens"]))
    t.add_row("layer-averaged n̄", f"{result['layer_avg_tokens']:.1f}")
    for conv in ("exact", "fastv", "swiglu"):
        p, u = result["flops"][conv], result["flops_unpruned"][conv]
        t.add_row(f"LLM prefill TFLOPs ({conv})", f"{p / 1e12:.4g} / {u / 1e12:.4g} unpruned ({100 * p / u:.1f}%)")
    t.add_row("LLM prefill ms", f"{result['prefill_ms']:.1f}")
    t.add_row(f"total ms (generate, {result['new_tokens']} tokens)", f"{result['total_ms']:.1f}")
    return t
