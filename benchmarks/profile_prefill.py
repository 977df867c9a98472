"""Where the prefill time goes (issue 26): the stock language model's op mix by length, and vtprune's engine share.

    python benchmarks/profile_prefill.py [--layers 2] [--lengths 640,256,192,128] [--methods pdrop,fastv]
        [--method-layers 8] [--repeats 3] [--json OUT]

Part A (the hardware's share): the *stock* decoder (LLaVA-1.5-7B widths, random weights, bf16, 1 thread, no
vtprune) on random hidden states of each length; per length the min-of-`repeats` time and a torch.profiler
split into linear layers (aten::mm/addmm/bmm/matmul/linear; their achieved GFLOP/s from the analytic
projection FLOPs), attention (SDPA) and everything else (norms, RoPE, activations, copies).
Part B (the engine's share): one vtprune prefill per method at 64 tokens (layer-averaged) under cProfile; the
cumulative time of the language model forward, of the decoder layers, and of vtprune's engine and method
functions (selection, signals, compaction), top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import torch

import vtprune
from vtprune.bench.core import BenchConfig, load_bench_model, make_inputs

LINEAR = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mkldnn_linear")


def stock_profile(lm, n: int, repeats: int) -> dict:
    """Stock decoder on (1, n, d): min time, and the profiler's self-time split."""
    d = lm.config.hidden_size
    x = torch.randn(1, n, d).to(next(lm.parameters()).dtype)
    mask = torch.ones(1, n, dtype=torch.long)
    times = []
    with torch.inference_mode():
        lm(inputs_embeds=x, attention_mask=mask, use_cache=True)
        for _ in range(repeats):
            t0 = time.perf_counter()
            lm(inputs_embeds=x, attention_mask=mask, use_cache=True)
            times.append((time.perf_counter() - t0) * 1e3)
        with torch.profiler.profile() as prof:
            lm(inputs_embeds=x, attention_mask=mask, use_cache=True)
    split = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3
        if ev.key in LINEAR:
            split["linear"] += ms
        elif "attention" in ev.key or "flash" in ev.key:
            split["attention"] += ms
        else:
            split["other"] += ms
    cfg = lm.config
    layers = len(lm.layers)
    head = cfg.hidden_size // cfg.num_attention_heads
    per_tok = 2 * (cfg.hidden_size * head * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2))
    per_tok += 2 * 3 * cfg.hidden_size * cfg.intermediate_size
    linear_gflop = per_tok * n * layers / 1e9
    total = sum(split.values())
    return {
        "n": n,
        "ms_min": min(times),
        "profile_ms": {k: round(v, 1) for k, v in split.items()},
        "share": {k: round(v / total, 3) for k, v in split.items()},
        "linear_gflops": round(linear_gflop / (split["linear"] / 1e3), 1),
    }


def engine_profile(model, inputs, method: str, budget, options: dict) -> dict:
    """cProfile of one vtprune prefill: LM total, decoder layers, and vtprune functions (cumulative ms)."""
    vtprune.apply(model, method, budget, **options)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=True)  # warm
            prof = cProfile.Profile()
            prof.enable()
            model(**inputs, use_cache=True)
            prof.disable()
    finally:
        vtprune.remove(model)
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
        if "vtprune/" in file and "/testing" not in file:
            rows.append((ct * 1e3, f"{file.split('vtprune/')[-1]}:{func}"))
        elif func == "forward" and "modeling_llama" in file and line:
            rows.append((ct * 1e3, f"transformers llama:{line}:forward"))
    rows.sort(reverse=True)
    return {"method": method, "budget": budget, "top": [(round(ms, 1), name) for ms, name in rows[:14]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lengths", default="640,256,192,128")
    ap.add_argument("--methods", default="pdrop,fastv,sparsevlm")
    ap.add_argument("--method-layers", type=int, default=8)
    ap.add_argument("--budget", default="192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out: dict = {"stock": [], "engine": []}
    cfg = BenchConfig(model="arch:llava-1.5-7b", methods=[], budgets=[], dtype="bfloat16", layers=args.layers)
    lengths = [int(v) for v in args.lengths.split(",") if v]
    if lengths:
        model, _ = load_bench_model(cfg)
        for n in lengths:
            r = stock_profile(model.model.language_model, n, args.repeats)
            out["stock"].append(r)
            print(json.dumps(r), flush=True)
        del model
    if args.methods:
        cfg = BenchConfig(
            model="arch:llava-1.5-7b", methods=[], budgets=[], dtype="bfloat16", layers=args.method_layers
        )
        model, _ = load_bench_model(cfg)
        inputs = make_inputs(model, cfg)
        budget = float(args.budget) if "." in args.budget else int(args.budget)
        opts = {"sparsevlm": {"schedule": "matched"}, "cdpruner": {"relevance": "llm"}}
        for m in args.methods.split(","):
            extra = dict(opts.get(m, {}))
            if m in ("resprune", "dcp_prune"):
                extra["tokenizer"] = model._bench_tokenizer
            r = engine_profile(model, inputs, m, budget, extra)
            out["engine"].append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
