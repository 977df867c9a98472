"""Selection time of every registered method, per image, next to the pruned prefill it buys (fp32, CPU, 1 thread).

    python benchmarks/selection_time.py [--repeats 5] [--warmup 1] [--methods resprune,vitcop] [--paired] [--json OUT]

Inputs (random tensors of the real sizes): N = 576 (one 24×24 grid, LLaVA-1.5) at K = 192/128/64 and
N = 2880 (base 24×24 + a 48×48 tile grid, LLaVA-NeXT-7B at 2×2 tiles) at K = 640/320/160; features
(N, 4096); every signal a method asks for gets a tensor of its documented shape (`vtprune.engine.signals`):
[CLS] attention, keys (N, 1024), head-mean keys (N, 64), 24 question tokens, 3 nouns, 32 question-span
rows. In-LLM signals (attention rows, key norms) are inputs here: their recomputation belongs to the
engine and is timed by `vtprune bench`. Every stage of a multi-stage method is timed (its `memo` passed
on), on the candidates the previous stage kept.

The last columns put the selection next to the prefill it prunes: LLaVA-1.5-7B's decoder at the
method's layer-averaged schedule (64 text tokens, `exact` FLOPs convention) converted to time with this
CPU's fp32 matmul throughput, measured in the same run as the best of 7 products (`--gflops` to override):
`sel %` = selection / pruned prefill. Selection times are the minimum over `--repeats` (shared hosts);
with `--paired` each row's throughput is instead the best of the reference GEMMs run right after each of its
repeats, so that a busy host slows numerator and denominator alike (the GFLOP/s column).
LLaVA-NeXT tokens carry the adapter's CLIP view ids (base view + four 24×24 tiles), so per-view methods
(VisPruner, CDPruner) run on five 576-token views as on the real model.
The goal (issues #4/#5): sel % <= 2.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vtprune.errors import VtpruneError
from vtprune.loading.arch import full_dims
from vtprune.measurement.flops import prefill_flops
from vtprune.methods import ImageTokens, build_method, method_names

D, C, DH = 4096, 1024, 64
T_Q, T_S, NOUNS, N_TEXT, LAYERS = 24, 32, 3, 64, 32
CASES = [("llava", (192, 128, 64)), ("next", (640, 320, 160))]
H = 32  # LLM query heads (LLaVA-1.5-7B)
#: options that let a method run without an external model (CDPruner's CLIP text tower)
OPTIONS = {"cdpruner": {"relevance": "llm"}}
#: extra rows: label -> (method, options)
VARIANTS = {"sparsevlm-v2": ("sparsevlm", {"version": "2.0"})}


def method_spec(label: str) -> tuple[str, dict]:
    """(registered name, options) of a table row label."""
    if label in VARIANTS:
        return VARIANTS[label]
    return label, dict(OPTIONS.get(label, {}))


def projector() -> torch.nn.Module:
    """LLaVA-1.5-7B's token-wise projector at real size (1024 -> 4096 -> 4096, GELU), random weights."""
    return torch.nn.Sequential(torch.nn.Linear(C, D), torch.nn.GELU(), torch.nn.Linear(D, D)).eval()


def layout(kind: str):
    """(coords (N, 2), crop (N,), grids, tile (N,) or None) of LLaVA-1.5 (one 24×24 grid) or NeXT (base +
    48×48 tile grid; `tile` = the CLIP view of each token as the LLaVA-NeXT adapter sets it: 0 base, 1..4
    the 24×24 quadrants of the tile grid, row-major)."""
    grids = [(24, 24)] if kind == "llava" else [(24, 24), (48, 48)]
    coords, crop = [], []
    for c, (h, w) in enumerate(grids):
        r = torch.arange(h * w)
        coords.append(torch.stack([r // w, r % w], 1))
        crop.append(torch.full((h * w,), c, dtype=torch.long))
    coords, crop = torch.cat(coords), torch.cat(crop)
    tile = None
    if kind != "llava":
        tile = torch.where(crop == 0, 0, 1 + (coords[:, 0] // 24) * 2 + coords[:, 1] // 24)
    return coords, crop, grids, tile


def signal(name: str, n: int, g: torch.Generator, n_views: int = 1):
    shapes = {
        "cls_attention": None,
        "last_token_attention": None,
        "layer_last_token_attention": None,
        "mean_received_attention": None,
        "key_norms": None,
        "vision_keys": (n, C),
        "vision_features": (n, C),
        "vision_head_keys": (n, DH),
        "question_embeddings": (T_Q, D),
        "suffix_embeddings": (T_S, D),
        "noun_embeddings": (NOUNS, D),
        "visual_embeddings": (n, D),
        "suffix_attention": (T_S, n),
        "suffix_attention_heads": (H, T_S, n),
        "suffix_rope_gravity": (T_S, n),
        "vision_cls_features": (n_views, C),
    }
    if name not in shapes:
        raise KeyError(name)
    shape = shapes[name]
    if shape is None:
        return torch.rand(n, generator=g).softmax(0) if "attention" in name else torch.rand(n, generator=g) + 1
    x = torch.randn(*shape, generator=g)
    if name == "suffix_rope_gravity":
        return x.abs() + 0.5
    return x.softmax(-1) if name.startswith("suffix_attention") else x


def view(feats, coords, crop, grids, index, names, memo, g, project=None, tile=None) -> ImageTokens:
    n = feats.shape[0]
    n_views = len(grids) if tile is None else int(tile.max()) + 1
    sig = {name: signal(name, n, g, n_views) for name in names if name != "question_text"}
    question = "what colour is the small cube"
    return ImageTokens(feats, coords, crop, grids, index, sig, 0, memo, question, tile, project)


def reference_gemm_ms() -> float:
    """One (256×4096)·(4096×4096) fp32 product (8.6 GFLOP), the paired throughput probe of every repeat."""
    a, b = _GEMM
    t0 = time.perf_counter()
    a @ b
    return (time.perf_counter() - t0) * 1e3


_GEMM = (torch.randn(256, 4096), torch.randn(4096, 4096))
GEMM_GFLOP = 2 * 256 * 4096 * 4096 / 1e9


def time_method(
    name: str, kind: str, budget: int, repeats: int, warmup: int, probe: list[float] | None = None
) -> tuple[list[float], list[int]]:
    """Min-of-repeats ms per stage (robust to other jobs on a shared host) and the schedule, for one image.

    probe: if a list, gets the time of `reference_gemm_ms` run right after each timed repeat (paired load)."""
    method = build_method(*method_spec(name))
    method.bind(LAYERS)
    stages = method.stages()
    proj = projector()
    coords, crop, grids, tile = layout(kind)
    n = coords.shape[0]
    counts = method.schedule(n, budget, "layer_avg", LAYERS)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, D, generator=g)
    runs: list[list[float]] = [[] for _ in stages]
    for rep in range(warmup + repeats):
        memo: dict = {}
        index = torch.arange(n)
        for s in range(len(stages)):
            k = counts[s]
            if k >= index.numel():
                continue
            project = proj if stages[s].before_llm else None  # a LLaVA model: the projector is offered
            tiles = tile[index] if tile is not None else None
            names = method.signals(s)
            image = view(feats[index], coords[index], crop[index], grids, index, names, memo, g, project, tiles)
            t0 = time.perf_counter()
            with torch.no_grad():
                plan = method.select(s, image, k)
            dt = time.perf_counter() - t0
            if rep >= warmup:
                runs[s].append(dt * 1e3)
            index = index[plan.keep_idx]
        if probe is not None and rep >= warmup:
            probe.append(reference_gemm_ms())
    return [min(r) if r else 0.0 for r in runs], counts


def per_layer(method_name: str, n: int, counts: list[int]) -> list[int]:
    """Visual tokens entering each of the 32 layers for a schedule."""
    method = build_method(*method_spec(method_name))
    method.bind(LAYERS)
    out, cur, cuts = [], n, {}
    for stage, k in zip(method.stages(), counts, strict=True):
        cuts[0 if stage.before_llm else stage.layer] = k
    for layer in range(LAYERS):
        cur = cuts.get(layer, cur)
        out.append(cur)
    return out


def cpu_gflops(tries: int = 7) -> float:
    """Measured fp32 matmul throughput of this CPU (1 thread), GFLOP/s: the best of `tries` (512×4096)·(4096×4096)
    products, so that the estimate is as little affected by other jobs on a shared host as the min-of-N
    selection times it is compared with."""
    a, b = torch.randn(512, 4096), torch.randn(4096, 4096)
    a @ b
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 512 * 4096 * 4096 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    ap.add_argument("--gflops", type=float, default=None, help="CPU fp32 GFLOP/s (default: measured)")
    ap.add_argument(
        "--paired",
        action="store_true",
        help="convert each row's prefill FLOPs with the GEMM throughput measured right after each of its repeats "
        "(best of them) instead of the run's best: the same load for numerator and denominator",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dims = full_dims("llava-1.5-7b")
    names = args.methods.split(",") if args.methods else method_names() + sorted(VARIANTS)
    # the GEMM throughput is re-measured before every method and the best value is used for every row: on a
    # shared host a single measurement may fall into a busy moment (15 vs 75 GFLOP/s seen on one run)
    gflops_seen: list[float] = []
    rows, skipped = [], []
    for name in names:
        try:
            if not build_method(*method_spec(name)).stages():
                continue
        except VtpruneError as err:
            skipped.append(f"{name:<10} skipped: {err}")
            continue
        if args.gflops is None:
            gflops_seen.append(cpu_gflops(3))
        for kind, budgets in CASES:
            n = 576 if kind == "llava" else 2880
            for k in budgets:
                probe: list[float] = []
                try:
                    stage_ms, counts = time_method(name, kind, k, args.repeats, args.warmup, probe)
                except VtpruneError as err:
                    rows.append({"method": name, "n": n, "budget": k, "infeasible": str(err)})
                    continue
                visual = per_layer(name, n, counts)
                rows.append(
                    {
                        "method": name,
                        "n": n,
                        "budget": k,
                        "schedule": counts,
                        "select_ms": round(sum(stage_ms), 3),
                        "stage_ms": [round(t, 3) for t in stage_ms],
                        "layer_avg_tokens": round(sum(visual) / LAYERS, 2),
                        "prefill_gflop": prefill_flops(visual, N_TEXT, dims, "exact") / 1e9,
                        "paired_gflops": round(GEMM_GFLOP / (min(probe) / 1e3), 1),
                    }
                )
                print(f"{name:<12} {n:>5} {k:>4} {sum(stage_ms):>10.2f} ms", flush=True)
    gflops = args.gflops or max(gflops_seen)
    print(
        f"\nselection per image (min of {args.repeats}, fp32, 1 CPU thread); prefill estimated at {gflops:.0f} GFLOP/s"
        f" (best of {len(gflops_seen)} measurements: {', '.join(f'{g:.0f}' for g in gflops_seen)})"
        if gflops_seen
        else f"\nselection per image (min of {args.repeats}, fp32, 1 CPU thread); prefill at {gflops:.0f} GFLOP/s"
    )
    print(
        f"{'method':<12} {'N':>5} {'K':>4} {'stages':<22} {'select ms':>10} {'per stage ms':<22} "
        f"{'n̄':>7} {'prefill ms':>10} {'sel %':>6} {'GFLOP/s':>7}"
    )
    for line in skipped:
        print(line)
    for row in rows:
        name, n, k = row["method"], row["n"], row["budget"]
        if "infeasible" in row:
            print(f"{name:<12} {n:>5} {k:>4} infeasible: {row['infeasible'][:80]}")
            continue
        rate = row["paired_gflops"] if args.paired else gflops
        prefill_ms = row["prefill_gflop"] / rate * 1e3
        row["pruned_prefill_ms_est"] = round(prefill_ms, 1)
        row["select_pct"] = round(100 * row["select_ms"] / prefill_ms, 3)
        stages = "/".join(str(c) for c in row["schedule"])
        per = "/".join(f"{t:.1f}" for t in row["stage_ms"])
        flag = " !" if row["select_pct"] > 2 else ""
        print(
            f"{name:<12} {n:>5} {k:>4} {stages:<22} {row['select_ms']:>10.2f} {per:<22} "
            f"{row['layer_avg_tokens']:>7.1f} {prefill_ms:>10.0f} {row['select_pct']:>6.2f}{flag:<2} {rate:>7.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gflops": gflops, "gflops_seen": gflops_seen, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
