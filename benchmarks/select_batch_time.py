"""Selection time of a batch of images: `select` per image (the loop) against the method's `select_batch`.

    python benchmarks/select_batch_time.py --device cuda [--batch 16] [--n 576] [--dim 4096] [--out FILE.json]
    python benchmarks/select_batch_time.py --device cpu --batch 2 --n 64 --dim 32 --repeats 1   # seconds

For each method with a batched override (ResPrune, DivPrune, CDPruner with relevance="llm", VisPruner with its
similarity on the projector outputs) and each budget:
random LLaVA-1.5-7B-shaped projector outputs (B images of N tokens, width `dim`, bf16 on CUDA), the loop and the
batched call timed alternately (`repeats` rounds after one warm-up, median ms, with a device synchronisation),
and whether every image's kept set is identical. The batched path is forced (`batch_on_cpu`, and VisPruner's
`batch_on_accelerators`); ResPrune, DivPrune and CDPruner use it by default on accelerators only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from vtprune.contract.method import ImageTokens
from vtprune.methods import build_method

METHODS = [("resprune", {}), ("divprune", {}), ("cdpruner", {"relevance": "llm"}), ("vispruner", {})]


def images(batch: int, n: int, dim: int, device: str, dtype: torch.dtype) -> list[ImageTokens]:
    gen = torch.Generator().manual_seed(0)
    side = int(round(n**0.5))
    coords = torch.stack([torch.arange(n) // side, torch.arange(n) % side], 1)
    out = []
    for b in range(batch):
        signals = {"noun_embeddings": torch.randn(2, dim, generator=gen).to(device, dtype),
                   "question_embeddings": torch.randn(12, dim, generator=gen).to(device, dtype),
                   "cls_attention": torch.rand(n, generator=gen).to(device)}  # fmt: skip
        feats = torch.randn(n, dim, generator=gen).to(device, dtype)
        crop = torch.zeros(n, dtype=torch.long, device=device)
        out.append(ImageTokens(feats, coords.to(device), crop, [(side, side)], torch.arange(n, device=device),
                               signals, seed=b, question="what colour is the square left of the circle?"))  # fmt: skip
    return out


def timed(fn, device: str) -> tuple[float, list]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3, out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=576)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--budgets", default="192,128,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma-separated subset of resprune,divprune,cdpruner,vispruner")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    imgs = images(args.batch, args.n, args.dim, args.device, dtype)
    rows = []
    for name, options in METHODS:
        if args.methods and name not in args.methods.split(","):
            continue
        method = build_method(name, options)
        method.available_signals = frozenset({"question_embeddings", "noun_embeddings", "question_text"})
        method.bind(32)
        method.batch_on_cpu = method.batch_on_accelerators = True  # VisPruner's accelerator path is opt-in
        for k in (int(b) for b in args.budgets.split(",")):
            ks = [k] * len(imgs)
            loop_ms, batched_ms = [], []
            def per_image(method=method, ks=ks):
                return [method.select(0, im, kk) for im, kk in zip(imgs, ks, strict=True)]

            def batched_call(method=method, ks=ks):
                return method.select_batch(0, imgs, ks)

            for r in range(args.repeats + 1):
                t_loop, loop = timed(per_image, args.device)
                t_batch, batched = timed(batched_call, args.device)
                if r:  # the first round warms up
                    loop_ms.append(t_loop)
                    batched_ms.append(t_batch)
            same = all(torch.equal(a.keep_idx.cpu(), b.keep_idx.cpu()) for a, b in zip(loop, batched, strict=True))
            row = {"method": name, "budget": k, "batch": args.batch, "n": args.n, "dim": args.dim,
                   "loop_ms": statistics.median(loop_ms), "batched_ms": statistics.median(batched_ms),
                   "identical_keep_sets": same}  # fmt: skip
            rows.append(row)
            print(f"{name:9s} K={k:4d}  loop {row['loop_ms']:8.1f} ms  batched {row['batched_ms']:8.1f} ms  "
                  f"({row['loop_ms'] / row['batched_ms']:.1f}x)  identical: {same}", flush=True)  # fmt: skip
    if args.out:
        env = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
