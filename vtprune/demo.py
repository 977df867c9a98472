"""`vtprune demo`: what pruning buys and costs, offline, in a few minutes on 2 CPU cores.

With the shipped `builtin:shapes-llava` model: a short `compare` on the built-in benchmark (accuracy per
method and budget, tokens, FLOPs, prefill time), printed as a table and drawn as a plot.
Without it (a checkout that has no trained checkpoint yet): the same table on a random
LLaVA-1.5-geometry model, where next-token agreement with the unpruned model stands in for accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Feasible on the 8-layer random model (FastV k=2 needs n̄ ≥ 145 there); the quick set covers every method.
CASES = [
    ("none", 576, {}),
    ("random", 64, {}),
    ("pool", 64, {}),
    ("fastv", 192, {}),
    ("random", 192, {}),
    ("pool", 192, {}),
    ("fastv", 160, {}),
]
QUICK = 4


# Pre-LLM methods only: the built-in decoder has 3 layers, where in-LLM methods (FastV, PDrop, SparseVLM,
# ViTCoP) cannot reach a layer-averaged budget of 192 or less (docs/testbed.md, the compare table).
DEMO_METHODS = ("random", "pool", "divprune", "visionzip", "vispruner", "resprune", "dcp_prune")


def run_demo(
    quick: bool = False, out: str | Path = "vtprune-out/demo", n_per_type: int = 20, fmt: str = "table"
) -> int:
    """The demo: exit status 0 when every cell ran, 1 when some could not (results written, failures listed)."""
    from vtprune.testbed import builtin_names

    if "shapes-llava" in builtin_names():
        return run_builtin_demo(quick, out, n_per_type, fmt)
    return run_random_demo(quick, out, fmt)


def run_builtin_demo(quick: bool, out: str | Path, n_per_type: int, fmt: str = "table") -> int:
    """Short comparison on the shipped model: a few methods × budgets (192, 64, 16) on held-out questions, and
    one image with the kept tokens of four methods (`show.png`, question, expected and given answers)."""
    import torch

    import vtprune
    from vtprune.eval.compare import run_compare_report
    from vtprune.eval.shapes import load_model, load_samples

    torch.set_num_threads(1)
    model, processor = load_model("builtin:shapes-llava")
    samples, _ = load_samples(max(1, n_per_type // 2) if quick else n_per_type)
    methods = [m for m in DEMO_METHODS if m in vtprune.methods()]
    budgets = (64,) if quick else (192, 64, 16)
    report = run_compare_report(model, processor, samples, methods, budgets, out, "demo", "builtin:shapes-llava, CPU",
                                rounds=2 if quick else 3, fmt=fmt)  # fmt: skip
    from vtprune.runner import wrap
    from vtprune.show import show

    s, shown = samples[0], [m for m in ("pool", "divprune", "visionzip", "vispruner") if m in methods]
    pic = show(wrap(model, processor, "builtin:shapes-llava"), s["image"], s["question"], shown, 64,
               Path(out) / "show.png", max_new_tokens=1, expected=s["answer"])  # fmt: skip
    print(f"kept tokens of {', '.join(shown)} at 64 on one image: {pic.path}", file=sys.stderr)
    if report.failed:
        print(f"vtprune demo: {len(report.failed)} of {report.asked} cells did not run: {', '.join(report.failed)}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def run_random_demo(quick: bool = False, out: str | Path = "vtprune-out/demo", fmt: str = "table") -> int:
    import torch

    import vtprune
    from vtprune.measurement.timing import interleaved
    from vtprune.progress import track
    from vtprune.tables import Col, ResultTable, write_json
    from vtprune.testing import llava_inputs, tiny_llava

    torch.set_num_threads(1)
    model = tiny_llava(layers=8, hidden=256, heads=8, kv_heads=8, intermediate=688, vision_hidden=64, seed=0)
    prompts = [([1, 3 + i, 4 + i], [7 + i, 8, 9, 10, 11 + i, 12]) for i in range(4 if quick else 8)]
    inputs = llava_inputs(model, prompts, seed=1)
    with torch.inference_mode():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        full_next = model(**inputs).logits[:, -1].argmax(-1)
    lm_inputs = {
        "input_ids": inputs["input_ids"][:1],
        "attention_mask": inputs["attention_mask"][:1],
        "mm_encoder_outputs": {
            "image": type(model.model.get_image_features(pixel_values=inputs["pixel_values"][:1]))(
                pooler_output=[feats[0]]
            )
        },
    }
    rows = []
    cases = CASES[:QUICK] if quick else CASES
    for method, budget, options in track(cases, description="demo"):
        with vtprune.pruned(model, method, budget, **options):
            with torch.inference_mode():
                nxt = model(**inputs).logits[:, -1].argmax(-1)
            rec = vtprune.last_run(model)
            timing = interleaved({"pruned": lambda: model(**lm_inputs)}, rounds=2 if quick else 4)["pruned"]
        rows.append(
            {
                "method": method,
                "budget": budget,
                "retained_tokens": rec.summary()["retained_tokens"],
                "layer_avg_tokens": rec.summary()["layer_avg_tokens"],
                "flops_fastv": rec.flops["fastv"],
                "prefill_ms": timing.min_ms,
                "agreement": float((nxt == full_next).float().mean()),
            }
        )
    base = rows[0]
    for r in rows:
        r["flops_pct"] = 100 * r["flops_fastv"] / base["flops_fastv"]
        r["speed_up"] = base["prefill_ms"] / r["prefill_ms"]
    title = "vtprune demo: random LLaVA-1.5-geometry model (8 layers × 256), CPU, 1 thread"
    table = ResultTable(title, [
        Col("method", "method", "l"), Col("budget", "budget"), Col("retained_tokens", "retained", fmt="{:.0f}".format),
        Col("layer_avg_tokens", "n̄", fmt="{:.1f}".format), Col("flops_pct", "FLOPs %", fmt="{:.1f}".format),
        Col("prefill_ms", "prefill ms", fmt="{:.1f}".format), Col("speed_up", "speed-up", fmt="{:.2f}×".format),
        Col("agreement", "next-token agree", fmt="{:.2f}".format),
    ])  # fmt: skip
    for r in rows:
        table.add(r)
    table.footer.append(
        "The model is random: agreement only shows how far each method moves the output, not accuracy. "
        "prefill ms: min over interleaved rounds of one sample."
    )
    sys.stdout.write(table.render(fmt))
    write_json(Path(out) / "demo.json", rows)
    print(f"results: {Path(out) / 'demo.json'}", file=sys.stderr)
    return 0
