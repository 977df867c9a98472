"""Selection time of every registered method's `select`, per image, on random tensors (fp32, CPU, 1 thread).

    python benchmarks/selection_time.py [--repeats 7] [--warmup 2] [--methods divprune,visionzip]

Inputs: N = 576 (one 24×24 grid) at K = 192/128/64 and N = 2880 (5 grids of 24×24, LLaVA-NeXT-like) at
K = 640/320/160; features (N, 4096) (projector outputs in LLM space), `cls_attention` (N,) and
`vision_keys` (N, 1024) for vision-stage methods. In-LLM methods (e.g. fastv) get a random score for the
signal they ask for, so only their ranking step is timed (not the engine's attention-row recomputation).
Multi-stage methods: the first stage's `select` is timed. Median over repeats after warm-up, in ms.
Selection time only: the engine's signal capture, compaction and the LLM are not included.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vtprune.methods import ImageTokens, build_method, method_names

D, C = 4096, 1024
CASES = [(1, (192, 128, 64)), (5, (640, 320, 160))]


def make_image(crops: int, seed: int = 0) -> ImageTokens:
    g = torch.Generator().manual_seed(seed)
    n = 576 * crops
    r = torch.arange(576)
    coords = torch.stack([r // 24, r % 24], 1).repeat(crops, 1)
    crop = torch.arange(crops).repeat_interleave(576)
    signals = {
        "cls_attention": torch.randn(n, generator=g).softmax(0),
        "vision_keys": torch.randn(n, C, generator=g),
    }
    return ImageTokens(torch.randn(n, D, generator=g), coords, crop, [(24, 24)] * crops, torch.arange(n), signals, seed)


def with_signals(image: ImageTokens, names: frozenset[str]) -> ImageTokens:
    """Add a random (n,) score for every requested signal the image does not have (in-LLM signals)."""
    extra = {name: torch.rand(image.n) for name in names if name not in image.signals}
    return ImageTokens(image.features, image.coords, image.crop, image.grids, image.original_index,
                       {**image.signals, **extra}, image.seed)


def time_select(method, image: ImageTokens, k: int, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        method.select(0, image, k)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        method.select(0, image, k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.methods.split(",") if args.methods else method_names()
    images = {crops: make_image(crops) for crops, _ in CASES}
    header = f"{'method':<12} {'stage':<8} " + "  ".join(
        f"{f'N={576 * c} K={k}':>16}" for c, budgets in CASES for k in budgets
    )
    print(f"selection time per image, ms (median of {args.repeats}; fp32, CPU, 1 thread; D={D}, C={C})")
    print(header)
    print("-" * len(header))
    for name in names:
        method = build_method(name, {})
        stages = method.stages()
        if not stages:
            continue
        cells = []
        for crops, budgets in CASES:
            image = with_signals(images[crops], method.signals(0))
            for k in budgets:
                kk = method.schedule(image.n, k, "retained", 32)[0]
                cells.append(f"{time_select(method, image, kk, args.warmup, args.repeats):>16.2f}")
        print(f"{name:<12} {str(stages[0]):<8} " + "  ".join(cells))


if __name__ == "__main__":
    main()
