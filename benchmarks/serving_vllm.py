"""Serving benchmark: vLLM (CPU backend) with and without vtprune's plugin, at several concurrency levels.

Model: LLaVA-1.5-7B widths (`vtprune/assets/arch/llava-1.5-7b.json`: CLIP ViT-L/14-336, 4096-wide Llama decoder)
with the decoder truncated to `--layers` layers and random weights (`load_format="dummy"`, nothing downloaded).
Per (setting, concurrency c): `--requests` requests, each one noise image + a short prompt, run closed-loop with c
requests in flight (`LLMEngine.add_request` / `step`: a new request enters when one finishes); greedy,
`--max-tokens` new tokens, `ignore_eos`.

Reported: requests/s (requests / wall time), median / p90 time to first token (submission to the first generated
token, seen by the client), prompt tokens per request, and the peak KV-cache blocks in use (vLLM's
`vllm:kv_cache_usage_perc` gauge read after every engine step × the engine's block count).

Run inside the vLLM venv (scripts/vllm_env.sh --build):
    .venv-vllm/bin/python benchmarks/serving_vllm.py --out runs/serving_vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the machine is shared

ARCH = Path(__file__).resolve().parents[1] / "vtprune" / "assets" / "arch" / "llava-1.5-7b.json"


def save_arch(root: Path, layers: int) -> Path:
    """config.json (LLaVA-1.5-7B sizes, `layers` decoder layers), word tokenizer and processor; no weights."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaProcessor

    from vtprune.serving.testing import word_tokenizer

    spec = json.loads(ARCH.read_text())
    spec.pop("_source", None)
    spec["text_config"]["num_hidden_layers"] = layers
    config = LlavaConfig(**{k: v for k, v in spec.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(root)
    image_id = int(spec["image_token_id"])
    vocab = int(spec["text_config"]["vocab_size"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=word_tokenizer({image_id: "<image>"}, vocab=vocab),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(root)
    return root


def _kv_usage(engine) -> float:
    for metric in engine.get_metrics():
        if metric.name == "vllm:kv_cache_usage_perc":
            return float(metric.value)
    return 0.0


def closed_loop(engine, prompts: list[dict], params, concurrency: int) -> dict:
    """Keep `concurrency` requests in flight (a new one enters when one finishes) until all are done.

    -> wall time, per-request TTFT (submission to the first generated token, seen by this client) and latency,
    prompt tokens, the peak KV-cache usage fraction seen after any engine step."""
    pending = list(enumerate(prompts))
    start: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    prompt_tokens: dict[str, int] = {}
    peak = 0.0
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and len(start) - len(done) < concurrency:
            i, prompt = pending.pop(0)
            rid = f"r{i}"
            start[rid] = time.perf_counter()
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            now = time.perf_counter()
            if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                done[out.request_id] = now
                prompt_tokens[out.request_id] = len(out.prompt_token_ids)
        peak = max(peak, _kv_usage(engine))
    wall = time.perf_counter() - t0
    ttft = sorted(first[r] - start[r] for r in start)
    return {"wall": wall, "ttft": ttft, "prompt_tokens": list(prompt_tokens.values()), "peak_usage": peak}


def run_setting(root: Path, pruning: dict | None, levels: list[int], requests: int, max_tokens: int, dtype: str):
    from vllm import LLM, SamplingParams

    from vtprune.serving.testing import noise_image

    overrides = {"vtprune": pruning} if pruning else {}
    llm = LLM(
        str(root),
        load_format="dummy",
        dtype=dtype,
        max_model_len=2048,
        max_num_seqs=max(levels),
        enforce_eager=True,
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        disable_log_stats=False,
        seed=0,
        limit_mm_per_prompt={"image": 1},
        hf_overrides=overrides,
    )
    engine = llm.llm_engine
    blocks = int(engine.vllm_config.cache_config.num_gpu_blocks)
    block_size = int(engine.vllm_config.cache_config.block_size)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    closed_loop(engine, [{"prompt": "w5 <image> w6", "multi_modal_data": {"image": noise_image(99_999)}}], params, 1)
    rows = []
    for level in levels:
        batch = [
            {"prompt": f"w{5 + i % 7} w{20 + i % 11} <image> w{40 + i % 13} w8", "multi_modal_data": {"image": im}}
            for i, im in enumerate(noise_image(10_000 * level + i) for i in range(requests))
        ]
        res = closed_loop(engine, batch, params, level)
        ttft = res["ttft"]
        tokens = statistics.mean(res["prompt_tokens"])
        rows.append(
            {
                "concurrency": level,
                "requests": requests,
                "wall_s": res["wall"],
                "requests_per_s": requests / res["wall"],
                "ttft_median_s": statistics.median(ttft),
                "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
                "prompt_tokens": tokens,
                "kv_blocks_peak": round(res["peak_usage"] * blocks),
                "kv_blocks_per_request": -(-(int(tokens) + max_tokens) // block_size),
            }
        )
        print(json.dumps({"pruning": pruning, **rows[-1]}), flush=True)
    info = {"num_blocks": blocks, "block_size": block_size}
    del llm
    return rows, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers kept (LLaVA-1.5-7B has 32)")
    ap.add_argument("--levels", default="1,4", help="concurrency levels (requests in flight), comma-separated")
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--method", default="divprune")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", choices=("unpruned", "pruned"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    pruning = {"method": args.method, "budget": args.budget}
    if args.only:  # one engine per process: its memory is freed when the process ends
        rows, info = run_setting(
            args.root, pruning if args.only == "pruned" else None, levels, args.requests, args.max_tokens, args.dtype
        )
        print("RESULT " + json.dumps({"rows": rows, **info}), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = save_arch(Path(tmp), args.layers)
        for only, label in (("unpruned", "unpruned"), ("pruned", f"{args.method} {args.budget}")):
            cmd = [sys.executable, __file__, "--only", only, "--root", str(root)]
            for name in ("layers", "levels", "requests", "max_tokens", "method", "budget", "dtype"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
                raise SystemExit(f"setting {only!r} failed (exit {proc.returncode})")
            results[label] = json.loads(line[len("RESULT ") :])
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count(), "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print("| setting | concurrency | requests/s | TTFT median (s) | TTFT p90 (s) | prompt tokens | KV blocks peak |")
    print("|---|---|---|---|---|---|---|")
    for label, res in results.items():
        for r in res["rows"]:
            print(
                f"| {label} | {r['concurrency']} | {r['requests_per_s']:.3f} | {r['ttft_median_s']:.2f} | "
                f"{r['ttft_p90_s']:.2f} | {r['prompt_tokens']:.0f} | {r['kv_blocks_peak']} |"
            )


if __name__ == "__main__":
    main()
