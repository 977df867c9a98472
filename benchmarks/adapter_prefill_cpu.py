"""CPU prefill of the LLaVA-NeXT-7B and Qwen2.5-VL-7B adapters: all visual tokens vs 64 kept vs ρ = 1/9.

    python benchmarks/adapter_prefill_cpu.py [--layers 2] [--rounds 5] [--dtype bfloat16] [--methods random]
        [--features random|tower] [--json out.json]

Models: `arch:llava-next-7b` and `arch:qwen2.5-vl-7b` (`vtprune.loading.arch.build_arch`: real widths,
random weights, decoder truncated to `--layers`), bf16 like the LLaVA-1.5 CPU table in BENCHMARKS.md.
Inputs, batch 1: 32 random text ids, one image, 32 random text ids (64 text tokens, as `vtprune bench`):
- LLaVA-NeXT: a 672×672 image = base view 576 + 2×2 tiles 2304 = N_img 2880 visual tokens (+ 48 newlines);
- Qwen2.5-VL: an 896×896 image = 32×32 = 1024 visual tokens (so that 64 kept and ρ = 1/9 = 114 differ).
Image features are computed once and passed as `mm_encoder_outputs` (`--features random`, the default:
N(0, 1) rows of the right count, since the decoder's time does not depend on their values; `tower`: the
real random-weight vision towers, much slower on CPU), so only the language-model side is timed.
Pruning: a pre-LLM method (`random` by default, also `pool`), `tokens` 64 and `ratio` 1/9.

Timing: 1 torch thread; per round every case once in turn (attach the method, one forward, detach),
after 1 warm-up round; medians (and minima) over `--rounds`.
- `llm ms`: the language model's prefill only (decoder layers + norm; `PrefillTimer`), the column
  `prefill ms` of BENCHMARKS.md;
- `fwd ms`: the whole top-level forward (adds embedding, M-RoPE ids, pre-LLM selection and compaction); the
  LM head is swapped for an identity here, because for one row of a 152k/32k vocabulary in bf16 the stock
  `logits_to_keep=1` path copies the whole head weight (~10 s per call on this CPU), which is no prefill work;
- speed-up = unpruned / pruned median `llm ms`; FLOPs bound = unpruned / pruned analytic LLM prefill FLOPs
  (`exact` convention, spec §5) at the built depth for the realised token counts (`RunRecord.flops`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.loading.arch import build_arch
from vtprune.measurement.timing import PrefillTimer
from vtprune.models import adapter_for

TEXT = 64
NEXT_IMAGE = (672, 672)
QWEN_IMAGE = (896, 896)


def _text_ids(config, gen) -> tuple[list[int], list[int]]:
    ids = [getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id")]
    high = min([config.text_config.vocab_size, *(i for i in ids if i is not None)])
    t = torch.randint(3, high, (TEXT,), generator=gen).tolist()
    return t[: TEXT // 2], t[TEXT // 2 :]


def _next_inputs(model, features: str, gen) -> dict:
    """ids with the packed placeholder count of one 672×672 image, and its features."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    h, w = adapter_for(model).tile_area(NEXT_IMAGE)
    n = side * side + h * (w + 1)
    sizes = torch.tensor([NEXT_IMAGE])
    if features == "tower":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        tiles = image_size_to_num_patches(list(NEXT_IMAGE), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        pix = torch.randn(1, tiles, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=gen)
        with torch.inference_mode():
            feats = model.model.get_image_features(pixel_values=pix.to(model.dtype), image_sizes=sizes).pooler_output
        feats = list(feats)
    else:
        feats = [torch.randn(n, cfg.text_config.hidden_size, generator=gen).to(model.dtype)]
    assert int(feats[0].shape[0]) == n
    pre, post = _text_ids(cfg, gen)
    ids = torch.tensor([pre + [cfg.image_token_id] * n + post])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "image_sizes": sizes,
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)},
    }


def _qwen_inputs(model, features: str, gen) -> dict:
    """ids of one 896×896 image (with its grid and token types for the M-RoPE ids), and its features."""
    from vtprune.models.qwen_inputs import build_qwen_inputs

    cfg = model.config
    vc = cfg.vision_config
    grid = torch.tensor([[1, QWEN_IMAGE[0] // vc.patch_size, QWEN_IMAGE[1] // vc.patch_size]])
    n = int(grid.prod()) // vc.spatial_merge_size**2
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pix = torch.randn(int(grid.prod()), width, generator=gen).to(model.dtype)
    if features == "tower":
        with torch.inference_mode():
            feats = list(model.model.get_image_features(pix, grid).pooler_output)
    else:
        feats = [torch.randn(n, cfg.text_config.hidden_size, generator=gen).to(model.dtype)]
    assert int(feats[0].shape[0]) == n
    inputs = build_qwen_inputs(cfg, [_text_ids(cfg, gen)], grid, pix)
    inputs.pop("pixel_values")
    inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    return inputs


def _cases(methods: list[str]) -> list[tuple[str, str, float | int]]:
    out = [("none", "all", 0.3)]
    for m in methods:
        out += [(m, "64", 64), (m, "1/9", 1 / 9)]
    return out


def run_arch(name: str, args) -> list[dict]:
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    model = build_arch(name, layers=args.layers, dtype=dtype, seed=0)
    built = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    inputs = (_next_inputs if name.startswith("llava-next") else _qwen_inputs)(model, args.features, gen)
    prepared = time.perf_counter() - t0 - built
    model.lm_head = torch.nn.Identity()  # see the module docstring (`fwd ms`)
    lm = model.model.language_model
    cases = _cases(args.methods.split(","))
    llm_ms: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    fwd_ms: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    records: dict[int, vtprune.RunRecord] = {}
    with torch.inference_mode():
        for r in range(1 + args.rounds):
            for i, (method, _, budget) in enumerate(cases):
                vtprune.apply(model, method, budget)
                try:
                    with PrefillTimer(lm) as timer:
                        start = time.perf_counter()
                        model(**dict(inputs), use_cache=True, logits_to_keep=1)
                        total = (time.perf_counter() - start) * 1e3
                    records[i] = vtprune.last_run(model)
                finally:
                    vtprune.remove(model)
                if r > 0:
                    llm_ms[i].append(timer.ms[0])
                    fwd_ms[i].append(total)
    rows = []
    for i, (method, label, _) in enumerate(cases):
        rec = records[i]
        s = rec.samples[0]
        rows.append(
            {
                "arch": name,
                "method": method,
                "budget": label,
                "n_visual": s.n_visual,
                "retained": s.retained_tokens,
                "n_text": s.n_text,
                "llm_median_ms": statistics.median(llm_ms[i]),
                "llm_min_ms": min(llm_ms[i]),
                "fwd_median_ms": statistics.median(fwd_ms[i]),
                "flops_exact": rec.flops["exact"],
                "samples_llm_ms": llm_ms[i],
            }
        )
    base = rows[0]
    for row in rows:
        row["speedup"] = base["llm_median_ms"] / row["llm_median_ms"]
        row["flops_bound"] = base["flops_exact"] / row["flops_exact"]
    print(
        f"\n{name}: {args.layers} decoder layers, {args.dtype}, features={args.features}; "
        f"built in {built:.0f} s, inputs in {prepared:.0f} s"
    )
    head = f"{'method':8s} {'budget':>6s} {'N':>5s} {'K':>5s} {'text':>5s} {'llm ms':>9s} {'(min)':>8s} "
    print(head + f"{'fwd ms':>9s} {'speed-up':>9s} {'FLOPs bound':>12s} {'% of bound':>11s}")
    for row in rows:
        print(
            f"{row['method']:8s} {row['budget']:>6s} {row['n_visual']:5d} {row['retained']:5d} {row['n_text']:5d} "
            f"{row['llm_median_ms']:9.1f} {row['llm_min_ms']:8.1f} {row['fwd_median_ms']:9.1f} "
            f"{row['speedup']:8.2f}× {row['flops_bound']:11.2f}× {100 * row['speedup'] / row['flops_bound']:10.0f}"
        )
    del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--methods", default="random", help="comma-separated pre-LLM methods (random, pool)")
    ap.add_argument("--features", default="random", choices=["random", "tower"])
    ap.add_argument("--arch", default="llava-next-7b,qwen2.5-vl-7b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, "
        f"{args.rounds} rounds after 1 warm-up, interleaved"
    )
    rows = []
    for name in args.arch.split(","):
        rows += run_arch(name, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
