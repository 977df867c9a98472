"""Layer feasibility of the v3 model organism (issue 21): every in-LLM method's layers scale from LLaVA-1.5-7B's
32 without collisions, and each layer-averaged budget feasible on LLaVA-1.5-7B is feasible on the v3 decoder."""

from __future__ import annotations

import pytest

from vtprune.budget import BudgetError
from vtprune.methods import build_method
from vtprune.testbed.model import V3

IN_LLM = ("fastv", "pdrop", "sparsevlm", "vitcop")
# (method, options): SparseVLM's default "reference" schedule uses the authors' table rows (n̄ 82 for "64" on 32
# layers); its "matched" schedule is the layer-averaged one.
CONFIGS = (("fastv", {}), ("pdrop", {}), ("sparsevlm", {"schedule": "matched"}), ("vitcop", {}))
BUDGETS = (192, 128, 64, 32, 16)
N, REF_LAYERS = 576, 32


def _realised(name: str, options: dict, layers: int, budget: int) -> float | None:
    """Layer-averaged visual tokens n̄ the method's own schedule realises on a decoder of `layers` (vision-stage
    cuts count for every layer), or None when the schedule refuses the budget."""
    method = build_method(name, dict(options))
    method.bind(layers)
    method.validate(layers)
    try:
        counts = method.schedule(N, budget, "layer_avg", layers)
    except BudgetError:
        return None
    per_layer, n, stages = [], N, list(method.stages())
    cut = {}
    for stage, k in zip(stages, counts, strict=True):
        if stage.kind == "llm":
            cut[stage.layer] = k
        else:
            n = k  # before the decoder
    for layer in range(layers):
        n = cut.get(layer, n)
        per_layer.append(n)
    return sum(per_layer) / layers


def _layers(name: str, layers: int) -> list[int]:
    method = build_method(name, {})
    method.bind(layers)
    return [s.layer for s in method.stages() if s.kind == "llm"]


@pytest.mark.parametrize("name", IN_LLM)
def test_stage_layers_scale_without_collisions(name):
    ref, ours = _layers(name, REF_LAYERS), _layers(name, V3.text_layers)
    assert len(ours) == len(ref) == len(set(ours)), (ref, ours)  # distinct layers, as many as on 7B
    assert ours == sorted(ours) and all(0 < k < V3.text_layers for k in ours)


@pytest.mark.parametrize("ratio", (1 / 3, 2 / 9, 1 / 9))
def test_rcp_placement_scales_and_its_repair_is_delayed(ratio):
    """RCP's three pruners and two repair layers stay distinct, and every repair reads a pruner at an earlier
    layer (on the 3-layer v2 decoder the one repair layer coincided with its source)."""
    from vtprune.rcp.placement import placement_for

    ref, ours = placement_for(REF_LAYERS, ratio), placement_for(V3.text_layers, ratio)
    assert len(set(ours.pruning_layers)) == len(ref.pruning_layers) == 3
    assert len(set(ours.repair_layers)) == len(ref.repair_layers)
    assert all(source < repair for repair, source in ours.source_map.items())
    assert len(set(ours.source_map.values())) == len(ours.source_map)


@pytest.mark.parametrize(("name", "options"), CONFIGS)
def test_layer_averaged_budgets_reached_on_7b_are_reached_on_v3(name, options):
    for budget in BUDGETS:
        ref = _realised(name, options, REF_LAYERS, budget)
        if ref is not None and abs(ref - budget) <= 1.0:
            ours = _realised(name, options, V3.text_layers, budget)
            assert ours is not None and abs(ours - budget) <= 1.0, (
                f"{name} realises n̄ = {ref:.1f} for {budget} on 32 layers but {ours} on {V3.text_layers}")
    assert _realised(name, options, V3.text_layers, 64) == pytest.approx(64, abs=1.0)


def test_shallower_decoders_would_not_do():
    """Why the v3 decoder is as deep as LLaVA-1.5-7B's: FastV's K = 2 and PDrop's first boundary are not scaled,
    so n̄ = 64 is infeasible for them below 19 layers, and SparseVLM's first cut (after layer 2 of 32, scaled)
    leaves its layer-averaged ("matched") 64 infeasible on 24 layers."""
    assert V3.text_layers == REF_LAYERS
    assert _realised("fastv", {}, 12, 64) is None and _realised("pdrop", {}, 12, 64) is None
    assert _realised("sparsevlm", {"schedule": "matched"}, 24, 64) is None
    assert _realised("sparsevlm", {"schedule": "matched"}, REF_LAYERS, 64) == pytest.approx(64, abs=1.0)


@pytest.fixture(scope="module")
def v3_model():
    import torch

    from vtprune.testbed.data_v3 import balanced_samples, build_model, build_processor
    from vtprune.testbed.splits import calibration_split

    torch.manual_seed(0)
    return build_model().eval(), build_processor(), balanced_samples(calibration_split(), 1)[:3]


@pytest.mark.parametrize(("name", "options"), CONFIGS)
def test_engine_reaches_a_layer_averaged_64_on_the_v3_model(name, options, v3_model):
    """The engine runs each in-LLM method on the (untrained) v3 preset model at n̄ = 64: the realised visual
    tokens per decoder layer average to 64 (± rounding), with the pruning inside the decoder."""
    import vtprune
    from vtprune.testbed.evaluate import evaluate
    from vtprune.testbed.questions_v3 import answer_vocabulary

    model, processor, samples = v3_model
    vtprune.apply(model, name, budget=64, **options)
    try:
        res = evaluate(model, processor, samples, batch_size=3, answers=answer_vocabulary())
        run = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    assert res["n"] == 3
    for sample in run.samples:
        per_layer = sample.visual_per_layer
        assert len(per_layer) == V3.text_layers and per_layer[-1] < per_layer[0]
        assert abs(sum(per_layer) / len(per_layer) - 64) <= 2, per_layer


# --- ViTCoP at the paper budgets and the extreme ones (issue 22 item 3) ---------------------------------------
# spec vitcop.md table for LLaVA-1.5-7B (32 layers, N = 576): n1 / R2 / R3 at L_s = 2, L_d = 22
VITCOP_TABLE = {192: (288, 253, 51), 128: (230, 165, 33), 64: (172, 77, 15)}


def _vitcop_counts(budget: int) -> list[int]:
    method = build_method("vitcop", {})
    method.bind(V3.text_layers)
    return method.schedule(N, budget, "layer_avg", V3.text_layers)


def test_vitcop_schedule_on_v3_reaches_paper_and_extreme_budgets():
    """On the v3 decoder (32 layers, like LLaVA-1.5-7B) ViTCoP acts at llm:2 / llm:22 and realises the spec's
    n̄ 192.06 / 127.81 / 63.56 with its n1 / R2 / R3; 32 and 16 are reached within half a token, 16 only through
    the spec's fallback (v = 0.2 + 0.9ρ gives R2 < C + 1, so v is lowered); below the smallest feasible budget
    the schedule refuses with a BudgetError that names it."""
    from vtprune.methods.vitcop import cluster_count, realised_layer_avg

    method = build_method("vitcop", {})
    method.bind(V3.text_layers)
    assert method.layers() == (2, 22)
    for budget in BUDGETS:
        n1, r2, r3 = _vitcop_counts(budget)
        nbar = realised_layer_avg(n1, r2, r3, V3.text_layers, 2, 22)
        assert nbar == _realised("vitcop", {}, V3.text_layers, budget)  # the engine-side layer walk agrees
        assert abs(nbar - budget) <= 0.5, (budget, n1, r2, r3, nbar)
        assert r2 >= cluster_count(N, n1) + 1 and r3 == round(r2 / 5 + 1e-9) and 1 <= r3 < r2 < n1 < N
        if budget in VITCOP_TABLE:
            assert (n1, r2, r3) == VITCOP_TABLE[budget]
        rule_n1 = int((0.2 + 0.9 * budget / N) * N + 1e-9)  # Stage I keep of the spec's v rule
        assert (n1 == rule_n1) == (budget != 16), (budget, n1, rule_n1)  # only 16 needs the fallback
    smallest = next(b for b in range(1, N) if _realised("vitcop", {}, V3.text_layers, b) is not None)
    assert smallest < 16
    with pytest.raises(BudgetError, match=f"smallest feasible budget is {smallest}"):
        method.schedule(N, smallest - 1, "layer_avg", V3.text_layers)


@pytest.mark.parametrize("preset", ["default", "reference"])
def test_vitcop_engine_realises_every_budget_on_the_v3_model(preset, v3_model):
    """The engine runs ViTCoP on the (untrained) v3 model at 192 / 128 / 64 / 32 / 16, default preset and the
    reference preset (with its per-stage positions): the visual tokens entering each of the 32 decoder layers are
    n1 ×2, R2 ×20, R3 ×10 of the schedule, every stage prunes, and the reference ids are in the record."""
    import vtprune
    from vtprune.testbed.evaluate import evaluate
    from vtprune.testbed.questions_v3 import answer_vocabulary

    model, processor, samples = v3_model
    positions = "reindex,keep,reindex" if preset == "reference" else "keep"
    for budget in BUDGETS:
        n1, r2, r3 = _vitcop_counts(budget)
        vtprune.apply(model, "vitcop", budget, preset=preset, positions=positions)
        try:
            res = evaluate(model, processor, samples, batch_size=3, answers=answer_vocabulary())
            run = vtprune.last_run(model)
        finally:
            vtprune.remove(model)
        assert res["n"] == 3 and run.positions == positions
        for sample in run.samples:
            assert sample.n_visual == N
            assert sample.visual_per_layer == [n1] * 2 + [r2] * 20 + [r3] * 10, (budget, sample.visual_per_layer)
            assert [len(e.keep_idx) for e in sample.events] == [n1, r2, r3]
