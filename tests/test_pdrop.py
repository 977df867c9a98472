"""PyramidDrop: spec properties (pdrop.md "Properties a test can check"), the budget and paper schedules for
LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL shapes, errors, and the shared engine oracles (selection only) on the
three tiny families."""

from __future__ import annotations

import math

import pytest
import torch
from families import FAMILIES, check_oracles, family

import vtprune
from vtprune.errors import BudgetError, VtpruneError
from vtprune.methods import ImageTokens, build_method, stable_topk
from vtprune.methods.pdrop import boundaries, budget_first_count, layer_average

torch.set_num_threads(1)

BUDGETS = {"llava": 250, "llava_next": 0.5, "qwen2_5_vl": 0.5}  # feasible with b_1 = 2 on 6 layers


def _rhu(x: float) -> int:
    return math.floor(x + 0.5)


def _expected_per_layer(n: int, counts, bounds, num_layers: int) -> list[int]:
    out, cur = [], n
    for layer in range(num_layers):
        if layer in bounds:
            cur = counts[bounds.index(layer)]
        out.append(cur)
    return out


# ----------------------------------------------------------------------------------- property 1: schedules
@pytest.mark.parametrize("budget,counts", [(192, [312, 156, 78]), (128, [184, 92, 46]), (64, [56, 28, 14])])
def test_budget_schedule_llava_table(budget, counts):
    """Property 1: 576 → 312 → 156 → 78 for B = 192 on LLaVA-1.5 (L = 32), n̄ exactly B; k_1 = 2B − 72."""
    method = build_method("pdrop", {})
    assert method.boundaries(32) == (2, 10, 20)
    assert method.schedule(576, budget, "layer_avg", 32) == counts
    assert counts[0] == 2 * budget - 72
    assert layer_average(576, counts, (2, 10, 20), 32) == budget


@pytest.mark.parametrize("rho,counts", [(2 / 9, [920, 460, 230]), (1 / 9, [280, 140, 70])])
def test_budget_schedule_next_ratios(rho, counts):
    """LLaVA-NeXT (N_img = 2880): k_1 = 2B − N/8, n̄ = 640 / 320."""
    budget = _rhu(rho * 2880)
    method = build_method("pdrop", {})
    assert method.schedule(2880, budget, "layer_avg", 32) == counts
    assert counts[0] == 2 * budget - 2880 // 8
    assert layer_average(2880, counts, (2, 10, 20), 32) == budget


def test_budget_schedule_next_one_eighteenth_is_infeasible():
    with pytest.raises(BudgetError, match=r"k_1 = -40.*feasible budgets are 182\.\.1620"):
        build_method("pdrop", {}).schedule(2880, 160, "layer_avg", 32)


@pytest.mark.parametrize("n", [1008, 391, 1036])
@pytest.mark.parametrize("rho,frac", [(1 / 3, 0.524), (2 / 9, 0.302), (1 / 9, 0.079)])
def test_budget_schedule_qwen_ratios(n, rho, frac):
    """Qwen2.5-VL (L = 28): boundaries 2 / 9 / 18, k_1 = 2B − N/7 ≈ N·(0.524, 0.302, 0.079), n̄ ≈ ρN."""
    method = build_method("pdrop", {})
    assert method.boundaries(28) == (2, 9, 18)
    budget = _rhu(rho * n)
    counts = method.schedule(n, budget, "layer_avg", 28)
    assert counts[0] == _rhu(2 * budget - n / 7)
    assert counts[1:] == [counts[0] // 2, counts[0] // 4]
    assert abs(counts[0] / n - frac) < 0.005 + 1 / n
    assert abs(layer_average(n, counts, (2, 9, 18), 28) - budget) <= 14 / 28  # rounding of k_1 only


def test_budget_schedule_errors_name_the_feasible_range():
    method = build_method("pdrop", {})
    with pytest.raises(BudgetError, match=r"feasible budgets are 38\.\.324"):
        method.schedule(576, 37, "layer_avg", 32)
    with pytest.raises(BudgetError, match=r"k_1 = 728 > N = 576"):
        method.schedule(576, 400, "layer_avg", 32)
    assert method.schedule(576, 38, "layer_avg", 32) == [4, 2, 1]
    assert method.schedule(576, 324, "layer_avg", 32) == [576, 288, 144]


def test_paper_schedule_and_reference_preset():
    paper = build_method("pdrop", {"schedule": "paper"})
    assert paper.boundaries(32) == (8, 16, 24) and paper.boundaries(28) == (7, 14, 21)
    assert paper.schedule(576, 64, "layer_avg", 32) == [288, 144, 72]
    assert layer_average(576, [288, 144, 72], (8, 16, 24), 32) == 270
    assert build_method("pdrop", {"schedule": "paper", "lam": 0.25}).schedule(576, 64, "layer_avg", 32) == [144, 36, 9]
    ref = build_method("pdrop", {"preset": "reference"})
    assert ref.schedule_name == "paper" and ref.stages() == paper.stages()
    assert build_method("pdrop", {"preset": "reference", "schedule": "budget"}).schedule_name == "budget"


def test_retained_mode_and_lambda():
    method = build_method("pdrop", {})
    assert method.schedule(576, 192, "retained", 32) == [192, 96, 48]
    with pytest.raises(BudgetError, match="smallest feasible budget is 4"):
        method.schedule(576, 3, "retained", 32)
    lam = build_method("pdrop", {"lam": 0.6})
    k1 = budget_first_count(576, 192, (2, 10, 20), 32, 0.6)
    assert lam.schedule(576, 192, "layer_avg", 32) == [k1, math.floor(0.6 * k1), math.floor(0.36 * k1)]
    assert k1 == _rhu((32 * 192 - 2 * 576) / (8 + 0.6 * 10 + 0.36 * 12))


def test_shallow_models_keep_distinct_boundaries():
    assert boundaries("budget", 6) == (2, 3, 4) and boundaries("paper", 6) == (2, 3, 5)
    with pytest.raises(VtpruneError, match="three distinct stage boundaries"):
        build_method("pdrop", {}).validate(4)


# ----------------------------------------------------------------------------------- selection
def test_select_is_stable_topk_of_the_last_token_row():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(100, generator=g).round(decimals=1)  # many ties
    r = torch.arange(100)
    img = ImageTokens(
        torch.randn(100, 8),
        torch.stack([r // 10, r % 10], 1),
        torch.zeros(100, dtype=torch.long),
        [(10, 10)],
        r,
        {"layer_last_token_attention": scores},
    )
    keep = build_method("pdrop", {}).select(0, img, 37).keep_idx
    assert torch.equal(keep, stable_topk(scores, 37))
    order = sorted(range(100), key=lambda i: (-float(scores[i]), i))[:37]
    assert keep.tolist() == sorted(order)


# ----------------------------------------------------------------------------------- property 2
@pytest.mark.parametrize("name,budget", [("llava", 250), ("qwen2_5_vl", 0.5)])
def test_recomputed_row_equals_eager_attention(name, budget):
    """Property 2: the row PDrop ranks with at boundary b is layer b's *own* last-token attention on the
    hidden states entering layer b (sdpa model, no eager layer). At b_1 nothing is pruned yet, so it equals
    eager `output_attentions[b_1]` of the unpruned model over the visual columns; at later boundaries it is
    the same computation on the pruned-so-far rows (checked: a distribution over the current rows)."""
    fam = family(name)
    inputs = fam.batches[1]
    first = int((inputs["input_ids"][0] == fam.models["sdpa"].config.image_token_id).nonzero()[0])
    model = fam.models["sdpa"]
    vtprune.apply(model, "pdrop", budget)
    method = vtprune.session_of(model).method
    stock, seen = method.select, []

    def spy(stage, image, k):
        seen.append((image.n, image.signals["layer_last_token_attention"].clone()))
        return stock(stage, image, k)

    method.select = spy
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        vtprune.remove(model)
    assert model.config.text_config._attn_implementation == "sdpa"  # nothing switched to eager
    bounds = method.boundaries(6)
    with torch.no_grad():
        eager = fam.models["eager"](**inputs, output_attentions=True).attentions
    assert len(seen) == 3
    n, row = seen[0]
    ref = eager[bounds[0]][0, :, -1].float().mean(0)[first : first + n]
    assert (row - ref).abs().max() <= 1e-5
    assert not torch.allclose(row, eager[bounds[0] - 1][0, :, -1].float().mean(0)[first : first + n])
    for n_s, row_s in seen[1:]:
        assert row_s.shape == (n_s,) and float(row_s.min()) >= 0 and float(row_s.sum()) < 1


# ----------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", FAMILIES)
def test_realised_counts_nested_selection(name):
    """Property 1 (realised n̄ = formula, retained = N) and property 3 (tokens kept at stage s + 1 are a subset
    of those kept at stage s) on the tiny 6-layer models."""
    fam = family(name)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    method = build_method("pdrop", {})
    with vtprune.pruned(model, method, BUDGETS[name]), torch.no_grad():
        model(**inputs)
        record = vtprune.last_run(model)
    bounds = method.boundaries(6)
    assert bounds == (2, 3, 4)
    for sample in record.samples:
        n = sample.n_visual
        budget = BUDGETS[name] if isinstance(BUDGETS[name], int) else max(1, _rhu(BUDGETS[name] * n))
        counts = method.schedule(n, budget, "layer_avg", 6)
        assert counts[0] == 3 * budget - n  # k_1 = (6B − 2N) / (1 + 1/2 + 2/4)
        assert sample.visual_per_layer == _expected_per_layer(n, counts, bounds, 6)
        assert sample.retained_tokens == n
        assert sample.layer_avg_tokens == pytest.approx(layer_average(n, counts, bounds, 6))
        kept = [set(ev.keep_idx.tolist()) for ev in sample.events]
        assert [len(k) for k in kept] == counts
        assert kept[2] <= kept[1] <= kept[0]
        assert not any(ev.merged for ev in sample.events)


def test_layers_before_the_first_boundary_are_bit_identical():
    """Property 4: the outputs of layers 0 .. b_1 − 1 equal the unpruned model's exactly (sdpa)."""
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[1]
    layers = model.model.language_model.layers

    def run():
        outs, handles = {}, []
        for i in range(2):
            handles.append(layers[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in handles:
                h.remove()
        return [outs[i][0] if isinstance(outs[i], tuple) else outs[i] for i in range(2)]

    stock = run()
    vtprune.apply(model, "pdrop", 250)
    try:
        pruned = run()
        assert vtprune.last_run(model).samples[0].visual_per_layer[:3] == [576, 576, 174]
    finally:
        vtprune.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(stock, pruned, strict=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_lambda_one_keeping_everything_is_the_identity(name):
    """Property 5: λ = 1 with k_1 = N (paper schedule: k_s = N) gives the unpruned logits bit-exactly."""
    fam = family(name)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    with torch.no_grad():
        ref = model(**inputs).logits
    vtprune.apply(model, "pdrop", 0.3, schedule="paper", lam=1.0)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        record = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    assert torch.equal(logits, ref)
    assert all(s.layer_avg_tokens == s.n_visual for s in record.samples)


# ----------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("name", FAMILIES)
def test_oracles_budget_schedule(name):
    check_oracles(name, "pdrop", BUDGETS[name], {}, selection_only=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_oracles_reference_preset_reindex(name):
    record = check_oracles(name, "pdrop", 0.3, {"preset": "reference", "positions": "reindex"}, selection_only=True)
    assert record.samples[0].visual_per_layer == _expected_per_layer(
        record.samples[0].n_visual, [int(record.samples[0].n_visual * 0.5**s) for s in (1, 2, 3)], (2, 3, 5), 6
    )


def test_oracles_paper_schedule_eager():
    check_oracles("llava", "pdrop", 64, {"schedule": "paper"}, selection_only=True, attn="eager", bypass=False)


# ----------------------------------------------------------------------------------- options and errors
def test_option_errors():
    with pytest.raises(VtpruneError, match="schedule"):
        build_method("pdrop", {"schedule": "pyramid"})
    for lam in (0.0, 1.5, -0.5, True):
        with pytest.raises(VtpruneError, match="lam"):
            build_method("pdrop", {"lam": lam})
    model = family("llava").models["sdpa"]
    with pytest.raises(BudgetError, match="feasible budgets"):
        vtprune.apply(model, "pdrop", 150)  # 6 layers: k_1 = 3B − N < 4
    assert vtprune.session_of(model) is None
