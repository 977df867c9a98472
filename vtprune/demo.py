"""`vtprune demo`: what pruning buys and costs, offline, in a few minutes on 2 CPU cores.

On a built-in model (default `vtprune.shipped.DEFAULT_BUILTIN`): a short `compare` on held-out questions with
its 95 % intervals, tokens, FLOPs and prefill time, printed as a table and drawn as a plot, plus one image with the
kept tokens of four methods. On a v3 model (`shapes-v3-llava`, 32-layer decoder, once shipped) in-LLM (FastV,
PDrop, ViTCoP) and pre-LLM (DivPrune, VisionZip, pooling) methods run side by side at 192 and 64 tokens on test
seed 30000; on the v2 model (`shapes-llava`, the default today) pre-LLM methods at 192 / 64 / 16 (its 3-layer
decoder leaves the in-LLM methods no feasible budget). When the default model is missing: one line saying so,
then the v2 model if it exists, else a random LLaVA-1.5-geometry model, where next-token agreement with the
unpruned model stands in for accuracy.
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


# v2 model: pre-LLM methods only: its decoder has 3 layers, where in-LLM methods (FastV, PDrop, SparseVLM,
# ViTCoP) cannot reach a layer-averaged budget of 192 or less (docs/testbed.md, the compare table).
DEMO_METHODS = ("random", "pool", "divprune", "visionzip", "vispruner", "resprune", "dcp_prune")
# v3 model (32 layers, LLaVA-1.5-7B's depth): in-LLM and pre-LLM methods side by side, every one feasible at
# 192 and 64 (FastV / PDrop cannot reach 32 or 16: compare shows why).
DEMO_V3_METHODS = ("fastv", "pdrop", "vitcop", "divprune", "visionzip", "pool")
DEMO_V3_BUDGETS = (192, 64)
# the picture: two pre-LLM and two in-LLM methods at 64 tokens
SHOW_V3 = ("pool", "divprune", "fastv", "vitcop")


def run_demo(quick: bool = False, out: str | Path = "vtprune-out/demo", n_per_type: int | None = None,
             fmt: str = "table", model: str | None = None, jobs: int = 1) -> int:
    """The demo: exit status 0 when every cell ran, 1 when some could not (results written, failures listed).
    `model`: builtin:NAME or a directory (default: the default built-in model, see the module docstring)."""
    from vtprune.shipped import BUILTIN_PREFIX, DEFAULT_BUILTIN, builtin_names

    if model is None:
        if DEFAULT_BUILTIN in builtin_names():
            model = BUILTIN_PREFIX + DEFAULT_BUILTIN
        else:
            from vtprune.commands.common import missing_builtin

            fallback = "builtin:shapes-llava" if "shapes-llava" in builtin_names() else "a random model"
            print(f"vtprune demo: {missing_builtin(DEFAULT_BUILTIN)}; running on {fallback}", file=sys.stderr)
            if fallback != "builtin:shapes-llava":
                return run_random_demo(quick, out, fmt)
            model = fallback
    return run_builtin_demo(quick, out, n_per_type, fmt, model=model, jobs=jobs)


def run_builtin_demo(quick: bool, out: str | Path, n_per_type: int | None = None, fmt: str = "table",
                     model: str = "builtin:shapes-llava", jobs: int = 1) -> int:
    """Short comparison on a built-in (or saved testbed) model: v3, in-LLM and pre-LLM methods at 192 / 64
    (quick: 64) on test seed 30000 (cells in `jobs` processes; two timing rounds on a batch of 8); v2, pre-LLM
    methods at 192 / 64 / 16 on the held-out set. Then one image with the kept tokens of four methods at 64 (`show.png`,
    question, expected and given answers)."""
    import torch

    import vtprune
    from vtprune.eval.benchmark import V3, V3_DEMO_N_PER_TYPE, benchmark_of, heldout_seeds
    from vtprune.eval.compare import run_compare_report
    from vtprune.eval.shapes import load_benchmark_samples, load_model

    torch.set_num_threads(1)
    m, processor = load_model(model)
    benchmark = benchmark_of(processor)
    if benchmark == V3:
        n = n_per_type or V3_DEMO_N_PER_TYPE
        samples, _ = load_benchmark_samples(V3, max(1, n // 2) if quick else n, test_seeds=heldout_seeds()[:1])
        methods = [x for x in DEMO_V3_METHODS if x in vtprune.methods()]
        budgets = (64,) if quick else DEMO_V3_BUDGETS
        shown = [x for x in SHOW_V3 if x in methods]
        meta = {"model": model, "benchmark": V3, "test_seeds": list(heldout_seeds()[:1]), "command": "vtprune demo"}
        rounds, batch = 2, 8  # timing rounds on a batch of 8: a third of the demo's time with 3 rounds of 16
    else:
        n = n_per_type or 20
        samples, _ = load_benchmark_samples(benchmark, max(1, n // 2) if quick else n)
        methods = [x for x in DEMO_METHODS if x in vtprune.methods()]
        budgets = (64,) if quick else (192, 64, 16)
        shown = [x for x in ("pool", "divprune", "visionzip", "vispruner") if x in methods]
        meta, jobs = {"model": model, "benchmark": benchmark, "command": "vtprune demo"}, 1
        rounds, batch = (2 if quick else 3), 16
    report = run_compare_report(m, processor, samples, methods, budgets, out, "demo", f"{model}, CPU",
                                batch_size=batch, rounds=rounds, fmt=fmt, jobs=jobs, model_source=model,
                                meta=meta)  # fmt: skip
    from vtprune.runner import wrap
    from vtprune.show import show

    s = samples[0]
    pic = show(wrap(m, processor, model), s["image"], s["question"], shown, 64, Path(out) / "show.png",
               max_new_tokens=1, expected=s["answer"])  # fmt: skip
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
