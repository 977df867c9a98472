"""One-command GPU benchmark (issue 26): every method on real-width VLMs with random weights, next to the stock model.

    bash benchmarks/gpu.sh [OUT_DIR]                      # on a CUDA machine (≈ 8 minutes on one H100/H200)
    python benchmarks/gpu_bench.py --out OUT_DIR [--time-budget 450] [--attn sdpa,flash_attention_2]
    python benchmarks/gpu_bench.py --tiny --out OUT_DIR   # CPU, tiny models, seconds (the CI check)

Stages, in priority order (each is written to OUT_DIR as soon as it finishes; a stage that would start after
`--time-budget` seconds is skipped and listed as such):
1. `arch:llava-1.5-7b` (LLaVA-1.5-7B widths, all 32 decoder layers, CLIP ViT-L/14-336 tower), bf16, SDPA,
   batch 1 then 16: every registered method (RCP needs a trained checkpoint and is left out) at 192 / 128 / 64
   (layer-averaged) tokens;
2. `arch:llava-next-7b` (672×672: 2880 visual tokens) and `arch:qwen2.5-vl-7b` (672×672: 576 tokens), batch 1,
   SDPA, every method at 64 tokens and at 1/9 of N;
3. stage 1 at batch 1 with FlashAttention-2, when `flash_attn` imports.
Per row (see `vtprune.bench.core`): LM prefill ms, TTFT ms (the whole first forward: vision tower,
selection, LLM, LM head), decode ms/token, peak CUDA memory, measured KV bytes, the FLOPs bound, and the
stock-equivalent ratio (the stock language model timed at each layer's realised length in the same rounds).
Methods that need per-method options run in their own interleaved group (each with its own unpruned row):
CDPruner with `relevance="llm"` (no CLIP text tower in an `arch:` model), SparseVLM with
`schedule="matched"` (its reference table only knows 192/128/96/64 of 576).

Outputs: OUT_DIR/gpu_bench.json ({"env": ..., "stages": [...]}) and OUT_DIR/gpu_bench.md (one table per
stage, rendered from the JSON; `python benchmarks/gpu_bench.py --render OUT_DIR/gpu_bench.json` re-renders).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

from vtprune.bench.core import BenchConfig, load_bench_model, run_bench
from vtprune.errors import VtpruneError
from vtprune.methods import build_method, method_names

#: options a method needs to run on an `arch:` / `tiny:` model (no external models, any budget)
METHOD_OPTIONS = {"cdpruner": {"relevance": "llm"}, "sparsevlm": {"schedule": "matched"}}
#: methods left out: RCP needs a checkpoint trained for the model
SKIP = {"none", "rcp"}
NINTH = 1 / 9


def default_methods() -> list[str]:
    out = []
    for name in method_names():
        if name in SKIP:
            continue
        try:
            if build_method(name, METHOD_OPTIONS.get(name, {})).stages():
                out.append(name)
        except VtpruneError:
            continue
    return out


def groups(methods: list[str]) -> list[tuple[list[str], dict]]:
    """Methods sharing one set of options run in one interleaved bench call."""
    plain = [m for m in methods if m not in METHOD_OPTIONS]
    out = [(plain, {})] if plain else []
    out += [([m], METHOD_OPTIONS[m]) for m in methods if m in METHOD_OPTIONS]
    return out


def plan(args) -> list[dict]:
    """The stages: {"name", "model", "layers", "attn", "batch", "budgets", "image_size"}."""
    if args.tiny:
        return [
            {
                "name": "llava tiny",
                "model": "tiny:llava",
                "layers": 4,
                "attn": "sdpa",
                "batch": b,
                "budgets": [64],
                "image_size": None,
            }
            for b in (1, 2)
        ] + [
            {
                "name": f"{m} tiny",
                "model": f"tiny:{m}",
                "layers": 4,
                "attn": "sdpa",
                "batch": 1,
                "budgets": [64, NINTH],
                "image_size": None,
            }
            for m in ("llava-next", "qwen2.5-vl")
        ]
    attns = args.attn.split(",")
    stages = [
        {
            "name": f"LLaVA-1.5-7B batch {b}",
            "model": "arch:llava-1.5-7b",
            "layers": None,
            "attn": attns[0],
            "batch": b,
            "budgets": [192, 128, 64],
            "image_size": None,
        }
        for b in args.batches
    ]
    stages += [
        {
            "name": "LLaVA-NeXT-7B",
            "model": "arch:llava-next-7b",
            "layers": None,
            "attn": attns[0],
            "batch": 1,
            "budgets": [64, NINTH],
            "image_size": (672, 672),
        },
        {
            "name": "Qwen2.5-VL-7B",
            "model": "arch:qwen2.5-vl-7b",
            "layers": None,
            "attn": attns[0],
            "batch": 1,
            "budgets": [64, NINTH],
            "image_size": (672, 672),
        },
    ]
    for attn in attns[1:]:
        stages.append(
            {
                "name": f"LLaVA-1.5-7B batch 1 {attn}",
                "model": "arch:llava-1.5-7b",
                "layers": None,
                "attn": attn,
                "batch": 1,
                "budgets": [192, 128, 64],
                "image_size": None,
            }
        )
    return stages


def environment(device: str) -> dict:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
    try:
        import flash_attn  # noqa: F401

        env["flash_attn"] = flash_attn.__version__
    except Exception:
        env["flash_attn"] = None
    return env


def run_stage(stage: dict, args, methods: list[str], deadline: float = float("inf")) -> dict:
    """One model, one attention, one batch size: each method group interleaved with its own unpruned row.

    deadline: `time.perf_counter()` value after which no further method group starts (listed as skipped)."""
    t0 = time.perf_counter()
    base = BenchConfig(
        model=stage["model"],
        methods=[],
        budgets=stage["budgets"],
        batch=stage["batch"],
        dtype=args.dtype,
        attn=stage["attn"],
        device=args.device,
        layers=stage["layers"],
        repeats=args.repeats,
        warmup=args.warmup,
        new_tokens=args.new_tokens,
        image_size=stage["image_size"],
    )
    built = load_bench_model(base)
    results, skipped = [], []
    try:
        for names, options in groups(methods):
            if time.perf_counter() > deadline:
                skipped.append(",".join(names))
                continue
            cfg = BenchConfig(**{**base.__dict__, "methods": names, "options": dict(options)})
            results.append(run_bench(cfg, progress=False, built=built))
    finally:
        del built
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = {**stage, "seconds": round(time.perf_counter() - t0, 1), "runs": results}
    if skipped:
        out["skipped_groups"] = skipped
    return out


def _f(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def render(data: dict) -> str:
    """Markdown: one table per stage; the unpruned row of each interleaved group first."""
    env = data["env"]
    lines = [
        f"Device: {env.get('gpu') or env.get('cpu')} ({env['device']}); torch {env['torch']}, "
        f"transformers {env['transformers']}, flash_attn {env.get('flash_attn')}",
        "",
    ]
    cols = (
        "method | budget | K | n̄ | prefill ms | TTFT ms | decode ms/tok | speed-up | FLOPs bound | % of bound "
        "| ÷ stock | stock % of bound | select ms | peak MiB | KV MiB"
    )
    for st in data["stages"]:
        if st.get("skipped"):
            lines += [f"### {st['name']}: skipped ({st['skipped']})", ""]
            continue
        if st.get("skipped_groups"):
            lines += [f"Method groups skipped (time budget): {'; '.join(st['skipped_groups'])}", ""]
        lines += [
            f"### {st['name']} ({st['model']}, {st['attn']}, batch {st['batch']}, {st['seconds']} s)",
            "",
            "| " + cols + " |",
            "|" + "---|" * len(cols.split("|")),
        ]
        for run in st["runs"]:
            for r in run["rows"]:
                budget = r["budget"] if not isinstance(r["budget"], float) else f"{r['budget']:.3g}"
                if r.get("error"):
                    lines.append(f"| {r['method']} | {budget} | infeasible: {r['error'][:80]} |" + " |" * 12)
                    continue
                sv = r.get("speedup_vs_bound")
                lines.append(
                    f"| {r['method']} | {budget} | {r['retained_tokens']:.0f} | {r['layer_avg_tokens']:.1f} "
                    f"| {_f(r.get('prefill_ms'), '.1f')} | {_f(r.get('forward_prefill_ms'), '.1f')} "
                    f"| {_f(r.get('decode_ms_per_token'), '.2f')} | {_f(r.get('speedup_prefill'), '.2f')}× "
                    f"| {_f(r.get('flops_bound'), '.2f')}× | {_f(100 * sv if sv else None, '.0f')} "
                    f"| {_f(r.get('vs_stock'), '.3f')} "
                    f"| {_f(100 * r['stock_vs_bound'] if r.get('stock_vs_bound') else None, '.0f')} "
                    f"| {_f(r.get('selection_ms'), '.2f')} | {_f((r.get('peak_mem_bytes') or 0) / 2**20, '.0f')} "
                    f"| {r['kv_bytes'] / 2**20:.1f} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu", help="output directory")
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny models, 2 methods: the CI check of this script")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (float32 with --tiny)")
    ap.add_argument("--attn", default=None, help="comma-separated; default: sdpa, plus flash_attention_2 if it imports")
    ap.add_argument("--batches", default="1,16", help="batch sizes of stage 1")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method but rcp)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; 1 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1; 0 with --tiny)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens per call (default 8; 2 --tiny)")
    ap.add_argument("--time-budget", type=float, default=450.0, help="no stage starts after this many seconds")
    ap.add_argument("--stages", default=None, help="comma-separated substrings: run only the stages whose name has one")
    ap.add_argument("--render", default=None, help="only re-render this gpu_bench.json as markdown")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return {}
    tiny = args.tiny
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    args.repeats = args.repeats or (1 if tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if tiny else 1)
    args.new_tokens = args.new_tokens or (2 if tiny else 8)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.attn is None:
        args.attn = "sdpa" if tiny or environment(args.device)["flash_attn"] is None else "sdpa,flash_attention_2"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device here (use --tiny for the CPU check)")
    if args.device == "cpu":
        torch.set_num_threads(1)
    methods = args.methods.split(",") if args.methods else (["pool", "fastv"] if tiny else default_methods())
    os.makedirs(args.out, exist_ok=True)
    data = {"env": environment(args.device), "args": {k: v for k, v in vars(args).items()}, "stages": []}
    start = time.perf_counter()
    stages = plan(args)
    if args.stages:
        stages = [s for s in stages if any(k.strip().lower() in s["name"].lower() for k in args.stages.split(","))]
    for stage in stages:
        elapsed = time.perf_counter() - start
        if elapsed > args.time_budget:
            data["stages"].append({**stage, "skipped": f"time budget: {elapsed:.0f} s > {args.time_budget:.0f} s"})
        else:
            print(f"[{elapsed:6.1f} s] {stage['name']} ...", flush=True)
            data["stages"].append(run_stage(stage, args, methods, start + args.time_budget))
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(data, f, indent=1, default=str)
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
            f.write(render(data) + "\n")
    print(f"done in {time.perf_counter() - start:.0f} s -> {args.out}/gpu_bench.md")
    return data


if __name__ == "__main__":
    main()
