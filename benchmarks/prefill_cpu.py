"""Prefill time of a ~100M-parameter random LLaVA on CPU: all tokens vs 64 kept (pre-LLM and FastV).

    python benchmarks/prefill_cpu.py [--rounds 7] [--json out.json]

LLM: Llama 8 layers × 1024 (16 heads, MLP 2816) ≈ 103 M parameters; prompt 32 text + 576 image +
32 text tokens; image features precomputed (passed as `mm_encoder_outputs`) so only the LLM prefill is
timed; 1 thread, cases interleaved per round, min and median over rounds (noisy shared 2-core host).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.measurement.timing import interleaved
from vtprune.testing import llava_inputs, tiny_llava

CASES = [
    ("none", 576, {}),
    ("random", 64, {}),
    ("pool", 64, {}),
    ("fastv", 64, {"budget_mode": "retained"}),
    ("fastv", 64, {"budget_mode": "retained", "k": 1}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    model = tiny_llava(layers=8, hidden=1024, heads=16, kv_heads=16, intermediate=2816, vocab=256,
                       vision_hidden=64, vision_layers=2, dtype=dtype)
    n_params = sum(p.numel() for p in model.model.language_model.parameters())
    inputs = llava_inputs(model, [(list(range(1, 33)), list(range(40, 72)))])
    with torch.inference_mode():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    lm_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                 "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(feats))},
                 "use_cache": True}
    results = []
    for method, budget, options in CASES:
        with vtprune.pruned(model, method, budget, **options):
            t = interleaved({"x": lambda: model(**lm_inputs)}, rounds=args.rounds, warmup=1)["x"]
            rec = vtprune.last_run(model)
        results.append({"method": method, "budget": budget, **{k: v for k, v in options.items()},
                        "retained": rec.samples[0].retained_tokens, "layer_avg": rec.samples[0].layer_avg_tokens,
                        "flops_fastv": rec.flops["fastv"], "flops_exact": rec.flops["exact"],
                        "min_ms": t.min_ms, "median_ms": t.median_ms})
    base = results[0]
    print(f"LLM parameters: {n_params / 1e6:.1f} M, dtype {args.dtype}, torch {torch.__version__}, 1 thread")
    print(f"{'case':32s} {'n̄':>7s} {'min ms':>8s} {'median':>8s} {'speed-up':>9s} {'FLOPs ratio (exact)':>20s}")
    for r in results:
        name = f"{r['method']} {r['budget']} " + ",".join(f"{k}={v}" for k, v in r.items()
                                                         if k in ("k", "budget_mode"))
        print(f"{name:32s} {r['layer_avg']:7.1f} {r['min_ms']:8.1f} {r['median_ms']:8.1f} "
              f"{base['min_ms'] / r['min_ms']:8.2f}× {base['flops_exact'] / r['flops_exact']:19.2f}×")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
