"""Analytic FLOPs / KV bytes: reproduce every worked number of spec README §4 and §5."""

from __future__ import annotations

import pytest

from vtprune.measurement import (
    CONVENTIONS,
    FlopsReport,
    LLMDims,
    QwenVisionDims,
    VisionDims,
    decode_flops,
    kv_cache_bytes,
    layer_avg_tokens,
    layer_flops,
    prefill_flops,
    prefill_flops_all,
    projector_flops,
    qwen_vit_flops,
    retained_tokens,
    tokens_per_layer,
    vision_flops,
    visual_kv_bytes,
)

MIB = 2**20
T = 1e12
N = 576
N_TEXT = 64
L7 = 32
DIMS_7B = LLMDims.preset("llava-1.5-7b")


def matches(value: float, printed: str) -> bool:
    """True if ``value`` rounds to ``printed`` at the printed number of decimals."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(value - float(printed)) <= 0.5 * 10.0**-decimals + 1e-9


def expand(stages: list[tuple[int, int]]) -> list[int]:
    """``[(count, n_layers), …]`` (the spec's ``576×2, 166×30`` notation) → per-layer counts."""
    return [count for count, n_layers in stages for _ in range(n_layers)]


FULL_FASTV = prefill_flops([N] * L7, N_TEXT, DIMS_7B, "fastv")

# §4 worked table: (setting, per-layer stages, n̄, prefill TFLOPs, % of full, visual KV MiB), as printed.
SECTION4_ROWS = [
    ("no pruning", [(576, 32)], "576", "3.329", "100", "288"),
    ("pre-LLM 192", [(192, 32)], "192", "1.306", "39.2", "96"),
    ("pre-LLM 128", [(128, 32)], "128", "0.976", "29.3", "64"),
    ("pre-LLM 64", [(64, 32)], "64", "0.649", "19.5", "32"),
    ("FastV R=166", [(576, 2), (166, 30)], "191.6", "1.306", "39.2", "95.8"),
    ("FastV R=98", [(576, 2), (98, 30)], "127.9", "0.979", "29.4", "63.9"),
    ("FastV R=30", [(576, 2), (30, 30)], "64.1", "0.654", "19.6", "32.1"),
    ("FastV R=192 unmatched", [(576, 2), (192, 30)], "216.0", "1.432", "43.0", "108"),
    ("PDrop 192", [(576, 2), (312, 8), (156, 10), (78, 12)], "192.0", "1.310", "39.4", "96"),
    ("ViTCoP 64", [(172, 2), (77, 20), (15, 10)], "63.6", "0.647", "19.4", "31.8"),
    ("SparseVLM 192", [(576, 3), (309, 4), (204, 9), (113, 16)], "206.5", "1.385", "41.6", "103"),
]


@pytest.mark.parametrize("row", SECTION4_ROWS, ids=[r[0] for r in SECTION4_ROWS])
def test_section4_table(row: tuple) -> None:
    _, stages, nbar, tflops, pct, kv_mib = row
    per_layer = expand(stages)
    assert len(per_layer) == L7
    flops = prefill_flops(per_layer, N_TEXT, DIMS_7B, "fastv")
    assert matches(layer_avg_tokens(per_layer), nbar)
    assert matches(flops / T, tflops)
    assert matches(100 * flops / FULL_FASTV, pct)
    # "visual KV (MiB)" = visual rows only, summed over layers = n̄ · 0.5 MiB (the same thing as
    # averaging rows per layer like n̄ and multiplying by the per-token KV size); FastV 166 → 95.8125.
    kv = visual_kv_bytes(per_layer, DIMS_7B)
    assert kv == kv_cache_bytes(per_layer, 0, DIMS_7B, 2)
    assert matches(kv / MIB, kv_mib)
    assert kv == pytest.approx(layer_avg_tokens(per_layer) * DIMS_7B.kv_bytes_per_token(), abs=0.5)


def test_section4_exact_values() -> None:
    fastv166 = expand([(576, 2), (166, 30)])
    assert layer_avg_tokens(fastv166) == pytest.approx(191.625)
    assert visual_kv_bytes(fastv166, DIMS_7B) / MIB == 95.8125
    assert retained_tokens(fastv166) == 576
    assert retained_tokens(expand([(172, 2), (77, 20), (15, 10)])) == 172
    assert retained_tokens([192] * 32) == 192


@pytest.mark.parametrize(("budget", "r"), [(192, 166), (128, 98), (64, 30)])
def test_fastv_matched_r(budget: int, r: int) -> None:
    # §4: R = round((L·B − k·N)/(L − k)) for a one-cut method at llm:2.
    assert round((L7 * budget - 2 * N) / (L7 - 2)) == r
    assert tokens_per_layer(N, [(2, r)], L7) == expand([(576, 2), (r, 30)])


def test_tokens_per_layer_schedules() -> None:
    assert tokens_per_layer(N, [], L7) == [576] * 32
    assert tokens_per_layer(N, [(0, 64)], L7) == [64] * 32
    assert tokens_per_layer(N, [(2, 312), (10, 156), (20, 78)], L7) == expand(
        [(576, 2), (312, 8), (156, 10), (78, 12)]
    )
    assert tokens_per_layer(N, [(0, 172), (2, 77), (22, 15)], L7) == expand([(172, 2), (77, 20), (15, 10)])
    assert tokens_per_layer(N, [(3, 309), (7, 204), (16, 113)], L7) == expand(
        [(576, 3), (309, 4), (204, 9), (113, 16)]
    )


@pytest.mark.parametrize(
    "cuts",
    [
        [(32, 10)],
        [(-1, 10)],
        [(5, 10), (5, 9)],
        [(5, 10), (3, 9)],
        [(2, 600)],
        [(2, 100), (4, 200)],
        [(2, -1)],
    ],
)
def test_tokens_per_layer_rejects(cuts: list[tuple[int, int]]) -> None:
    with pytest.raises(ValueError):
        tokens_per_layer(N, cuts, L7)


def test_sparsevlm_counters() -> None:
    # sparsevlm.md table: true n̄ (input convention) vs the authors' counter (count after each layer's
    # pruning, i.e. the input count of the next layer).
    rows = {
        "192": ([(576, 3), (309, 4), (204, 9), (113, 16)], "206.5", "192.0"),
        "128": ([(576, 3), (312, 4), (117, 9), (39, 16)], "145.4", "128.6"),
        "96": ([(576, 3), (249, 4), (55, 9), (27, 16)], "114.1", "96.9"),
        "64": ([(576, 3), (82, 4), (32, 9), (18, 16)], "82.2", "64.8"),
    }
    for stages, true_nbar, authors in rows.values():
        per_layer = expand(stages)
        assert matches(layer_avg_tokens(per_layer), true_nbar)
        assert matches(layer_avg_tokens(per_layer[1:] + per_layer[-1:]), authors)


def test_other_method_schedules() -> None:
    # vitcop.md realised n̄ column and pdrop.md budget schedules.
    assert matches(layer_avg_tokens(expand([(288, 2), (253, 20), (51, 10)])), "192.06")
    assert matches(layer_avg_tokens(expand([(230, 2), (165, 20), (33, 10)])), "127.81")
    assert matches(layer_avg_tokens(expand([(172, 2), (77, 20), (15, 10)])), "63.56")
    for b, k1 in [(192, 312), (128, 184), (64, 56)]:
        assert k1 == 2 * b - 72
        per_layer = tokens_per_layer(N, [(2, k1), (10, k1 // 2), (20, k1 // 4)], L7)
        assert matches(layer_avg_tokens(per_layer), f"{b}.0")
    # PDrop paper default 576 → 288 → 144 → 72 at 8/16/24: n̄ = 270, FLOPs ≈ 51.7 % of full.
    paper = tokens_per_layer(N, [(8, 288), (16, 144), (24, 72)], L7)
    assert layer_avg_tokens(paper) == 270
    assert matches(100 * prefill_flops(paper, N_TEXT, DIMS_7B) / FULL_FASTV, "51.7")


# §5 table: K, n, fastv T, swiglu T, exact TFLOPs.
SECTION5_ROWS = [
    (576, 640, "3.329", "4.252", "8.504"),
    (192, 256, "1.306", "1.675", "3.350"),
    (128, 192, "0.976", "1.253", "2.506"),
    (64, 128, "0.649", "0.833", "1.666"),
]


@pytest.mark.parametrize("row", SECTION5_ROWS, ids=[str(r[0]) for r in SECTION5_ROWS])
def test_section5_table(row: tuple) -> None:
    k, n, fastv, swiglu, exact = row
    assert k + N_TEXT == n
    per_layer = [k] * L7
    totals = prefill_flops_all(per_layer, N_TEXT, DIMS_7B)
    assert set(totals) == set(CONVENTIONS)
    assert matches(totals["fastv"] / T, fastv)
    assert matches(totals["swiglu"] / T, swiglu)
    assert matches(totals["exact"] / T, exact)
    for conv in CONVENTIONS:
        assert totals[conv] == pytest.approx(L7 * layer_flops(n, DIMS_7B, conv))
    # H_kv = H and H·d_h = d: exact is exactly twice the swiglu MAC count.
    assert totals["exact"] == pytest.approx(2 * totals["swiglu"])


def test_layer_flops_formulas() -> None:
    n, d, m = 640, 4096, 11008
    assert layer_flops(n, DIMS_7B, "fastv") == 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    assert layer_flops(n, DIMS_7B, "swiglu") == 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    q = LLMDims.preset("qwen2.5-vl-7b")
    n = 300
    expected = 2 * (
        n * 3584 * 28 * 128
        + 2 * n * 3584 * 4 * 128
        + n * 28 * 128 * 3584
        + 2 * n * n * 28 * 128
        + 3 * n * 3584 * 18944
    )
    assert layer_flops(n, q, "exact") == expected
    with pytest.raises(ValueError):
        layer_flops(n, q, "bogus")
    with pytest.raises(ValueError):
        prefill_flops([576] * 31, N_TEXT, DIMS_7B)


@pytest.mark.parametrize(
    ("k", "mib", "mb"), [(576, 288, "302.0"), (192, 96, "100.7"), (128, 64, "67.1"), (64, 32, "33.6")]
)
def test_section5_kv_bytes(k: int, mib: int, mb: str) -> None:
    assert DIMS_7B.kv_bytes_per_token(2) == 524_288  # 0.5 MiB per token per model
    vis = visual_kv_bytes([k] * L7, DIMS_7B, 2)
    assert vis == mib * MIB
    assert matches(vis / 1e6, mb)
    assert kv_cache_bytes([k] * L7, N_TEXT, DIMS_7B, 2) == (k + N_TEXT) * 524_288
    assert kv_cache_bytes([k] * L7, N_TEXT, DIMS_7B, 4) == 2 * (k + N_TEXT) * 524_288


def test_kv_bytes_in_llm_method() -> None:
    # fastv.md: KV = N rows in layers < K, R rows after (plus text in every layer).
    per_layer = tokens_per_layer(N, [(2, 166)], L7)
    per_row_layer = 2 * 32 * 128 * 2
    assert kv_cache_bytes(per_layer, N_TEXT, DIMS_7B) == (2 * 640 + 30 * 230) * per_row_layer


def test_qwen_kv_bytes_per_token() -> None:
    q = LLMDims.preset("qwen2.5-vl-7b")
    assert q.kv_bytes_per_token() == 57_344
    assert kv_cache_bytes([1] * 28, 0, q, 2) == 57_344
    assert LLMDims.preset("qwen2.5-vl-3b").kv_bytes_per_token() == 2 * 36 * 2 * 128 * 2


def test_presets() -> None:
    assert DIMS_7B == LLMDims(32, 4096, 11008, 32, 32, 128)
    assert LLMDims.preset("llava-next-7b") == DIMS_7B
    assert LLMDims.preset("LLaVA-1.5-13B") == LLMDims(40, 5120, 13824, 40, 40, 128)
    assert LLMDims.preset("qwen2.5-vl-7b") == LLMDims(28, 3584, 18944, 28, 4, 128)
    assert LLMDims.preset("qwen2.5-vl-3b") == LLMDims(36, 2048, 11008, 16, 2, 128)
    with pytest.raises(KeyError):
        LLMDims.preset("llama-70b")
    with pytest.raises(ValueError):
        LLMDims(32, 4096, 11008, 32, 5, 128)


def test_decode_flops() -> None:
    c = [700] * L7
    d, m, h, dh = 4096, 11008, 32, 128
    per_layer = 2 * (d * h * dh + 2 * d * h * dh + h * dh * d + 2 * 700 * h * dh + 3 * d * m)
    assert decode_flops(c, DIMS_7B) == L7 * per_layer
    # One token with a cache of itself only equals the exact prefill formula at n = 1.
    q = LLMDims.preset("qwen2.5-vl-7b")
    assert decode_flops([1] * 28, q) == pytest.approx(prefill_flops([0] * 28, 1, q, "exact"))
    with pytest.raises(ValueError):
        decode_flops([1] * 27, q)


def test_from_config_llama() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=160,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert LLMDims.from_config(cfg) == LLMDims(3, 64, 160, 4, 2, 16)
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=32
    )
    assert LLMDims.from_config(cfg) == LLMDims(2, 64, 128, 4, 4, 32)
    # Full-size LLaVA-1.5-7B text config reproduces the preset.
    cfg = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
    assert LLMDims.from_config(cfg) == DIMS_7B


def test_from_config_qwen() -> None:
    from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig

    text = Qwen2_5_VLTextConfig(
        num_hidden_layers=28,
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
    )
    assert LLMDims.from_config(text) == LLMDims.preset("qwen2.5-vl-7b")
    composite = Qwen2_5_VLConfig(
        text_config={
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
        },
        vision_config={"hidden_size": 1280, "out_hidden_size": 2048},
    )
    assert LLMDims.from_config(composite) == LLMDims(2, 64, 96, 4, 1, 16)
    assert QwenVisionDims.from_config(composite) == QwenVisionDims.preset("qwen2.5-vl-3b")


def test_vision_from_config() -> None:
    from transformers import CLIPVisionConfig

    small = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    )
    vd = VisionDims.from_config(small)
    assert vd == VisionDims(2, 32, 4, 64, 5, swiglu=False, has_cls=True, patch_size=14, num_channels=3)
    n = 5
    assert vision_flops(vd) == 2 * (4 * n * 32**2 + 2 * n * n * 32 + 2 * n * 32 * 64)
    clip_l = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    assert VisionDims.from_config(clip_l) == VisionDims.preset("clip-vit-l-14-336")


def test_clip_vision_and_projector() -> None:
    clip = VisionDims.preset("clip-vit-l-14-336")
    assert clip.num_tokens == 577 and clip.num_patches == 576 and clip.head_dim == 64
    fastv = vision_flops(clip, convention="fastv")
    assert fastv == 24 * (4 * 577 * 1024**2 + 2 * 577**2 * 1024 + 2 * 577 * 1024 * 4096)
    assert matches(fastv / T, "0.191")
    exact = vision_flops(clip, convention="exact")
    assert exact == 2 * fastv
    # DISCREPANCY (spec §5 prints "0.382 TFLOPs exact"): the exact form of the printed per-layer formula
    # gives 2 × 0.19061 = 0.38122 T, which rounds to 0.381, not 0.382 (0.382 looks like 2 × the rounded
    # 0.191). Only counting the patch-embedding conv (576·3·14²·1024 MACs, excluded by §5's "exclude
    # embeddings") reaches 0.3819 → 0.382; we test the formula's value and keep the conv as an option.
    assert matches(exact / T, "0.381")
    assert not matches(exact / T, "0.382")
    with_embed = vision_flops(clip, convention="exact", include_patch_embed=True)
    assert matches(with_embed / T, "0.382")
    assert matches(vision_flops(clip, include_patch_embed=True) / T, "0.191")
    # LLaVA-NeXT multiplies by the crop count.
    assert vision_flops(clip, n_crops=5) == 5 * fastv
    proj = projector_flops(576, 1024, 4096, 4096)
    assert proj == 576 * (1024 * 4096 + 4096**2)
    assert matches(proj / T, "0.012")
    assert projector_flops(576, 1024, 4096, 4096, convention="exact") == 2 * proj
    with pytest.raises(ValueError):
        vision_flops(clip, convention="swiglu")


def _qwen_reference(grid_thw: list[tuple[int, int, int]], dims: QwenVisionDims) -> float:
    """Brute-force Σ group² from transformers' own window / cu_seqlens routine."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    grid = torch.tensor(grid_thw)
    _, cu_window = get_vision_window_index(
        grid,
        spatial_merge_size=dims.spatial_merge_size,
        window_size=dims.window_size,
        patch_size=dims.patch_size,
    )
    windows = torch.diff(torch.unique_consecutive(cu_window)).tolist()
    frames = [h * w for t, h, w in grid_thw for _ in range(t)]
    n = sum(frames)
    d, m = dims.hidden, dims.intermediate
    s_win = sum(x * x for x in windows)
    s_full = sum(x * x for x in frames)
    n_full = len(dims.full_attn_blocks)
    return dims.depth * (4 * n * d * d + 3 * n * d * m) + 2 * d * (
        n_full * s_full + (dims.depth - n_full) * s_win
    )


def test_qwen_vit_flops() -> None:
    dims = QwenVisionDims.preset("qwen2.5-vl-7b")
    assert dims.head_dim == 80
    # 336×336 image → 24×24 patches: 9 full 8×8 windows; full attention over 576 patches.
    n, d, m = 576, 1280, 3420
    expected = 32 * (4 * n * d * d + 3 * n * d * m) + 2 * d * (4 * 576**2 + 28 * 9 * 64**2)
    assert qwen_vit_flops([(1, 24, 24)], dims) == expected
    assert qwen_vit_flops([(1, 24, 24)], dims, convention="exact") == 2 * expected
    # Partial edge windows (20×28 patches → rows 8,8,4 × cols 8,8,8,4), a video and two images at once.
    for grid in ([(1, 20, 28)], [(2, 12, 18)], [(1, 24, 24), (1, 36, 10)]):
        assert qwen_vit_flops(grid, dims) == _qwen_reference(grid, dims)
    s_win = (64 + 64 + 16) * (3 * 64 + 16)
    n = 560
    assert qwen_vit_flops([(1, 20, 28)], dims) == 32 * (4 * n * d * d + 3 * n * d * m) + 2 * d * (
        4 * n**2 + 28 * s_win
    )
    base = qwen_vit_flops([(1, 24, 24)], dims)
    merger = 144 * (5120 * 5120 + 5120 * 3584)
    assert qwen_vit_flops([(1, 24, 24)], dims, include_merger=True) == base + merger
    assert qwen_vit_flops([(1, 24, 24)], dims, include_patch_embed=True) == base + 576 * 1176 * 1280
    with pytest.raises(ValueError):
        qwen_vit_flops([(1, 23, 24)], dims)


def test_flops_report() -> None:
    per_layer = tokens_per_layer(N, [(2, 166)], L7)
    vis = vision_flops(VisionDims.preset("clip-vit-l-14-336"))
    report = FlopsReport.compute(per_layer, N_TEXT, DIMS_7B, vision=vis)
    assert report.fastv == prefill_flops(per_layer, N_TEXT, DIMS_7B, "fastv")
    assert report.exact == prefill_flops(per_layer, N_TEXT, DIMS_7B, "exact")
    assert report.kv_bytes == kv_cache_bytes(per_layer, N_TEXT, DIMS_7B)
    d = report.as_dict()
    assert set(d) == {"fastv", "swiglu", "exact", "vision", "kv_bytes"}
    assert matches(d["fastv"] / T, "1.306") and d["vision"] == vis
    trimmed = FlopsReport.compute(per_layer, N_TEXT, DIMS_7B, visual_cache_per_layer=[166] * L7)
    assert trimmed.kv_bytes == (166 + N_TEXT) * DIMS_7B.kv_bytes_per_token()
