"""Where an in-LLM method's prefill time goes on a GPU: torch.profiler over whole prefills, next to the stock model.

    python benchmarks/profile_gpu.py --out OUT_DIR [--batch 16] [--budget 64] [--methods fastv,pdrop,vitcop]
    python benchmarks/profile_gpu.py --tiny --out OUT_DIR     # CPU, tiny model, seconds (the CI check)

Per method (and the stock model, `none`): one prefill (`model(**inputs)`, the bench's random inputs) under
`torch.profiler` after warm-ups; reported: wall ms of the profiled prefill, the summed time of the device
kernels, the host synchronisations (`aten::item`, `aten::_local_scalar_dense`, `cudaStreamSynchronize`,
`cudaDeviceSynchronize`, device-to-host copies) and the top operators by self device time and by self host
time. A method whose wall time exceeds its kernel time by far is host-bound (Python, launches, syncs); one whose
kernel time exceeds the stock model's at the same realised lengths does extra device work.
Writes OUT_DIR/profile_gpu.json and OUT_DIR/profile_gpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import vtprune
from vtprune.bench.core import BenchConfig, load_bench_model, make_inputs

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
OPTIONS = {"sparsevlm": {"schedule": "matched"}}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile_one(model, inputs: dict, device: str, warmup: int, top: int) -> dict:
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
        _sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            model(**inputs)
            _sync(device)
            wall = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"

    def dev_us(e) -> float:
        return float(getattr(e, dev_attr, 0.0) or 0.0)

    # device time once: the kernels' own rows (an operator's self device time repeats its kernels' time)
    kernels_ms = sum(dev_us(e) for e in events if e.device_type != torch.autograd.DeviceType.CPU) / 1e3
    syncs = {e.key: e.count for e in events if e.key in SYNC_OPS}
    d2h = sum(e.count for e in events if "Memcpy DtoH" in e.key or e.key == "cudaMemcpy")
    by_dev = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU), key=dev_us,
                    reverse=True)[:top]  # operators (their kernels' time), not the kernels again  # fmt: skip
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "wall_ms": round(wall, 2),
        "kernels_ms": round(kernels_ms, 2),
        "host_syncs": syncs,
        "d2h_copies": d2h,
        "top_device": [(e.key, e.count, round(dev_us(e) / 1e3, 3)) for e in by_dev if dev_us(e) > 0],
        "top_host": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 3)) for e in by_host],
    }


def render(data: dict) -> str:
    lines = [f"Device: {data['env']['device']}; batch {data['args']['batch']}, budget {data['args']['budget']}, "
             f"model {data['args']['model']}", "",
             "| method | wall ms | device kernels ms | host syncs (item / sync calls) | D2H copies |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, r in data["runs"].items():
        syncs = ", ".join(f"{k.split('::')[-1]} {v}" for k, v in sorted(r["host_syncs"].items())) or "0"
        lines.append(f"| {name} | {r['wall_ms']:.1f} | {r['kernels_ms']:.1f} | {syncs} | {r['d2h_copies']} |")
    for name, r in data["runs"].items():
        lines += ["", f"#### {name}: top operators by self device time (name, calls, ms)", ""]
        lines += [f"- {k}: {c} calls, {ms} ms" for k, c, ms in r["top_device"]]
        lines += ["", f"#### {name}: top operators by self host time (name, calls, ms)", ""]
        lines += [f"- {k}: {c} calls, {ms} ms" for k, c, ms in r["top_host"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny LLaVA, the CI check of this script")
    ap.add_argument("--model", default=None, help="default arch:llava-1.5-7b (tiny:llava with --tiny)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--methods", default="fastv,pdrop,vitcop,sparsevlm")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    args.model = args.model or ("tiny:llava" if args.tiny else "arch:llava-1.5-7b")
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    cfg = BenchConfig(model=args.model, methods=[], budgets=[args.budget], batch=args.batch,
                      dtype="float32" if args.tiny else "bfloat16", device=args.device,
                      layers=32 if args.tiny else None)  # fmt: skip
    model, _ = load_bench_model(cfg)
    inputs = make_inputs(model, cfg)
    env = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__}  # fmt: skip
    data = {"env": env, "args": vars(args), "runs": {}}
    os.makedirs(args.out, exist_ok=True)
    for name in ["none", *args.methods.split(",")]:
        if name != "none":
            vtprune.apply(model, name, args.budget, **OPTIONS.get(name, {}))
        try:
            data["runs"][name] = profile_one(model, inputs, args.device, args.warmup, args.top)
        finally:
            if name != "none":
                vtprune.remove(model)
        r = data["runs"][name]
        print(f"{name:10s} wall {r['wall_ms']:8.1f} ms  kernels {r['kernels_ms']:8.1f} ms  syncs {r['host_syncs']}",
              flush=True)  # fmt: skip
        with open(os.path.join(args.out, "profile_gpu.json"), "w") as f:
            json.dump(data, f, indent=1, default=str)
        with open(os.path.join(args.out, "profile_gpu.md"), "w") as f:
            f.write(render(data))
    return data


if __name__ == "__main__":
    main()
