"""Properties of the first methods (spec baselines.md and fastv.md, "Properties a test can check")."""

from __future__ import annotations

import pytest
import torch
from factories import image_tokens
from scipy.stats import chisquare

import vtprune
from vtprune.measurement.flops import LLMDims, prefill_flops_all
from vtprune.methods import build_method, stable_topk
from vtprune.methods.base import one_cut_keep
from vtprune.methods.pool import cell_bounds, pool_grid, pooled_shape


def test_random_sorted_unique_deterministic_and_uniform():
    method = build_method("random", {})
    a = method.select(0, image_tokens(d=8, seed=1), 64).keep_idx
    assert torch.equal(a, method.select(0, image_tokens(d=8, seed=1), 64).keep_idx)
    assert not torch.equal(a, method.select(0, image_tokens(d=8, seed=2), 64).keep_idx)
    assert torch.equal(a, a.unique()) and len(a) == 64
    counts = torch.zeros(576)
    for s in range(1500):
        counts[method.select(0, image_tokens(d=8, seed=s), 64).keep_idx] += 1
    assert chisquare(counts.numpy()).pvalue > 1e-3  # every index chosen with frequency ≈ K/N


def test_random_per_crop_quotas():
    img = image_tokens(d=8)
    img.crop = (torch.arange(576) >= 400).long()
    img.grids = [(20, 20), (11, 16)]
    keep = build_method("random", {}).select(0, img, 100).keep_idx
    assert int((keep < 400).sum()) == 69 and int((keep >= 400).sum()) == 31  # 100·400/576 = 69.4


@pytest.mark.parametrize(
    "k,shape,exact_shape", [(192, (14, 14), (16, 12)), (128, (11, 12), (16, 8)), (64, (8, 8), (8, 8))]
)
def test_pool_shapes_match_spec(k, shape, exact_shape):
    assert pooled_shape(24, 24, k) == shape
    assert pooled_shape(24, 24, k, exact=True) == exact_shape


def test_pool_cells_are_means_and_identity():
    feats = torch.randn(576, 5)
    same, reps = pool_grid(feats, 24, 24, 24, 24)
    assert torch.allclose(same, feats) and torch.equal(reps, torch.arange(576))
    pooled, reps = pool_grid(feats, 24, 24, 11, 12)
    grid = feats.reshape(24, 24, 5)
    rows, cols = cell_bounds(24, 11), cell_bounds(24, 12)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            assert torch.allclose(pooled[i * 12 + j], grid[r0:r1, c0:c1].reshape(-1, 5).mean(0), atol=1e-6)
            assert reps[i * 12 + j] == ((r0 + r1 - 1) // 2) * 24 + (c0 + c1 - 1) // 2
    even, _ = pool_grid(feats, 24, 24, 8, 6)
    assert torch.allclose(even.mean(0), feats.mean(0), atol=1e-6)


def test_pool_method_realised_count_and_merges():
    plan = build_method("pool", {}).select(0, image_tokens(d=8), 192)
    assert len(plan.keep_idx) == 196 and plan.new_feats.shape == (196, 8)
    assert plan.weights.sum() >= 576  # PyTorch adaptive cells overlap when 14 does not divide 24
    assert build_method("pool", {}).select(0, image_tokens(d=8), 64).weights.sum() == 576  # 8×8 cells of 3×3
    assert torch.equal(plan.keep_idx, plan.keep_idx.sort().values)


def test_stable_topk_ties_and_shift_invariance():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    assert stable_topk(scores, 3).tolist() == [0, 1, 3]
    assert torch.equal(stable_topk(scores + 7.0, 3), stable_topk(scores, 3))


def test_fastv_budget_mapping_matches_spec_table():
    assert [one_cut_keep(576, b, 2, 32) for b in (192, 128, 64)] == [166, 98, 30]
    fastv = build_method("fastv", {"r": 0.5})
    assert fastv.schedule(576, 64, "layer_avg", 32) == [288]
    assert build_method("fastv", {}).schedule(576, 64, "retained", 32) == [64]


def test_fastv_keeps_the_highest_attention_tokens():
    attention = torch.rand(576, generator=torch.Generator().manual_seed(3))
    img = image_tokens(d=8, signals={"last_token_attention": attention})
    keep = build_method("fastv", {}).select(0, img, 30).keep_idx
    assert set(keep.tolist()) == set(img.signals["last_token_attention"].topk(30).indices.tolist())


def test_record_flops_match_measurement_formulas(models, batches):
    model, inputs = models["sdpa"], batches[2]
    with vtprune.pruned(model, "fastv", 200):
        with torch.no_grad():
            model(**inputs)
        rec = vtprune.last_run(model)
    dims = LLMDims.from_config(model.config.text_config)
    want = {"fastv": 0.0, "swiglu": 0.0, "exact": 0.0}
    for s, n_text in zip(rec.samples, (7, 9), strict=True):  # prompts have 3+4 and 2+7 text tokens
        assert s.n_text == n_text
        for key, value in prefill_flops_all([576, 576, 12, 12, 12, 12], n_text, dims).items():
            want[key] += value
    assert rec.flops == pytest.approx(want)
    assert rec.kv_bytes == sum((2 * 576 + 4 * 12 + 6 * s.n_text) * 2 * 2 * 16 * 4 for s in rec.samples)
    assert rec.summary()["layer_avg_tokens"] == pytest.approx((2 * 576 + 4 * 12) / 6)


def test_largest_remainder_split_never_exceeds_total():
    from vtprune.budget import largest_remainder_split

    assert largest_remainder_split(1, [576, 2304]) == [0, 1]
    assert largest_remainder_split(3, [5, 5, 5, 5]) == [1, 1, 1, 0]
    assert largest_remainder_split(100, [400, 176]) == [69, 31]
    for total in range(0, 40):
        parts = largest_remainder_split(total, [7, 1, 30])
        assert sum(parts) == min(total, 38) and all(0 <= p <= s for p, s in zip(parts, [7, 1, 30], strict=True))
