"""SparseVLM v1.5: spec properties (sparsevlm.md "Properties a test can check"), schedules and budgets for
LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL shapes, a naive DPC-kNN reference, errors, and the shared engine oracles on
the three tiny families (recycling merges, so selection_only=False; recycle=False is selection only).

SparseVLM+ (version="2.0"): the RoPE gravity W (pure function and engine signal, 1-D RoPE and M-RoPE) against
naive Python loops and against all-ones query/key vectors through the model's own rotary module; the per-head
signal and the gravity-corrected, head-selected relevance against a naive re-implementation from eager
`output_attentions`; the v2.0 table schedules; no recycling; the shared oracles (selection only, sdpa)."""

from __future__ import annotations

import math

import pytest
import torch
from factories import image_tokens
from families import FAMILIES, check_oracles, family

import vtprune
from vtprune.engine.signals import LLM_SIGNALS, rope_gravity
from vtprune.errors import BudgetError, UnsupportedInputError, VtpruneError
from vtprune.methods import build_method, stable_topk
from vtprune.methods.sparsevlm import (
    ROWS,
    ROWS_V2,
    authors_counter,
    dpc_knn,
    gravity_relevance,
    heads_kept,
    layer_average,
    prune_layers,
    rater_mask,
    rater_scores,
    recycle,
    recycle_sizes,
    split_count,
    stage_count,
)

torch.set_num_threads(1)

#: spec table: budget label -> (k_ℓ, resulting n_v, true n̄, authors' counter) on LLaVA-1.5-7B (N = 576, L = 32)
TABLE = {
    192: ((300, 200, 110), (309, 204, 113), 206.5, 192.0),
    128: ((303, 110, 36), (312, 117, 39), 145.4, 128.6),
    96: ((238, 48, 26), (249, 55, 27), 114.1, 96.9),
    64: ((66, 30, 17), (82, 32, 18), 82.2, 64.8),
}
BUDGETS = {"llava": 192, "llava_next": 2 / 9, "qwen2_5_vl": 1 / 3}  # table rows 192 / 128 / 192


def _rhu(x: float) -> int:
    return math.floor(x + 0.5)


# ----------------------------------------------------------------------------------- helpers
def _image(n=576, d=16, t=6, seed=0, feats=None):
    """n candidates on a 24×24 grid with SparseVLM's text signals (t text rows) drawn before the features."""
    g = torch.Generator().manual_seed(seed)
    signals = {
        "suffix_attention": torch.rand(t, n, generator=g) / n,
        "suffix_embeddings": torch.randn(t, d, generator=g),
        "visual_embeddings": torch.randn(n, d, generator=g),
    }
    feats = feats if feats is not None else torch.randn(n, d, generator=g)
    return image_tokens(n=n, feats=feats, signals=signals, seed=seed)


def _naive_dpc_knn(x: torch.Tensor, c: int):
    """sparsevlm.md DPC-kNN pseudo-code with Python loops (fp64), deterministic ties to the lower index."""
    x = x.double()
    m, d = x.shape
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(m)] for i in range(m)]
    rho = [math.exp(-sum(v**2 for v in sorted(row)[:c]) / c) for row in dist]
    dmax = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(m) if rho[j] > rho[i]] or [dmax]) for i in range(m)]
    score = [rho[i] * delta[i] for i in range(m)]
    centres = sorted(sorted(range(m), key=lambda i: (-score[i], i))[:c])
    labels = [min(range(c), key=lambda u: (dist[centres[u]][i], u)) for i in range(m)]
    for u, i in enumerate(centres):
        labels[i] = u
    return centres, labels


def _expected_per_layer(n: int, counts: list[int], stage_layers, num_layers: int) -> list[int]:
    out, cur = [], n
    for layer in range(num_layers):
        for s, sl in enumerate(stage_layers):
            if layer == sl:
                cur = counts[s]
        out.append(cur)
    return out


# ----------------------------------------------------------------------------------- property 1: schedules
@pytest.mark.parametrize("label", [192, 128, 96, 64])
def test_reference_schedule_equals_spec_table(label):
    """Property 1: 576 → 309 → 204 → 113 for "192" etc.; true n̄ and the authors' counter of the table."""
    k_l, n_v, true_avg, authors = TABLE[label]
    assert ROWS[label] == k_l
    method = build_method("sparsevlm", {})
    layers = method.stage_layers(32)
    assert layers == (3, 7, 16) and prune_layers(32) == (2, 6, 15)
    for mode in ("layer_avg", "retained"):  # the table does not depend on budget_mode
        assert method.schedule(576, label, mode, 32) == list(n_v)
    assert round(layer_average(576, n_v, layers, 32), 1) == pytest.approx(true_avg, abs=0.051)
    assert round(authors_counter(576, n_v, layers, 32), 1) == pytest.approx(authors, abs=0.051)
    recycling_off = build_method("sparsevlm", {"recycle": False})
    assert recycling_off.schedule(576, label, "layer_avg", 32) == list(k_l)


def test_layer_mapping_for_other_depths():
    assert prune_layers(28) == (2, 5, 13)  # Qwen2.5-VL-7B (spec table)
    assert prune_layers(6) == (0, 1, 3) and prune_layers(4) == (0, 1, 2)
    assert build_method("sparsevlm", {}).stage_layers(28) == (3, 6, 14)
    with pytest.raises(VtpruneError, match="too shallow"):
        build_method("sparsevlm", {}).validate(3)


def test_next_schedule_rows_and_infeasible_160():
    """LLaVA-NeXT (N_img = 2880, L = 32): 640 → row 128, 320 → row 64 (k_ℓ = 5·k_ℓ^LLaVA), 160 → error."""
    method = build_method("sparsevlm", {})
    for budget, row in ((640, 128), (320, 64), (960, 192)):
        ks = [_rhu(2880 * k / 576) for k in ROWS[row]]
        assert ks == [5 * k for k in ROWS[row]]
        want, cur = [], 2880
        for k in ks:
            m = math.floor(0.3 * (cur - k)) + 1
            cur = k + m // 10 + 1
            want.append(cur)
        assert method.schedule(2880, budget, "layer_avg", 32) == want
    with pytest.raises(BudgetError, match="270"):
        method.schedule(2880, 160, "layer_avg", 32)
    with pytest.raises(BudgetError, match="smallest feasible budget is"):
        build_method("sparsevlm", {"schedule": "matched"}).schedule(2880, 160, "layer_avg", 32)
    with pytest.raises(BudgetError, match="schedule='matched'"):
        method.schedule(576, 150, "layer_avg", 32)


@pytest.mark.parametrize("n", [391, 1036])
@pytest.mark.parametrize("rho,row", [(1 / 3, 192), (2 / 9, 128), (1 / 9, 64)])
def test_qwen_fractional_schedule(n, rho, row):
    """Qwen2.5-VL-7B (L = 28): ρ = 1/3, 2/9, 1/9 → rows 192 / 128 / 64 with k_ℓ = round(N·k_ℓ/576)."""
    budget = max(1, math.floor(rho * n + 0.5))
    counts = build_method("sparsevlm", {}).schedule(n, budget, "layer_avg", 28)
    cur, want = n, []
    for k_l in ROWS[row]:
        k = max(1, min(_rhu(n * k_l / 576), cur - 1))
        cur = k + recycle_sizes(cur - k)[1]
        want.append(cur)
    assert counts == want


@pytest.mark.parametrize(
    "n,budget,layers",
    [(576, 192, 32), (576, 128, 32), (576, 64, 32), (2880, 640, 32), (2880, 320, 32)]
    + [(n, _rhu(r * n), 28) for n in (391, 1036) for r in (1 / 3, 2 / 9)],
)
def test_matched_schedule_reaches_the_layer_average(n, budget, layers):
    method = build_method("sparsevlm", {"schedule": "matched"})
    counts = method.schedule(n, budget, "layer_avg", layers)
    avg = layer_average(n, counts, method.stage_layers(layers), layers)
    assert abs(avg - budget) <= 0.5, (counts, avg)
    assert counts == sorted(counts, reverse=True) and counts[-1] >= 1


@pytest.mark.parametrize("n", [391, 1036])
def test_matched_qwen_one_ninth_is_infeasible(n):
    """ρ = 1/9 on 28 layers: 3 unpruned layers give 3N/28 = 0.107·N, plus the recycled clusters > N/9."""
    with pytest.raises(BudgetError, match="smallest feasible budget"):
        build_method("sparsevlm", {"schedule": "matched"}).schedule(n, _rhu(n / 9), "layer_avg", 28)


def test_matched_retained_means_tokens_after_the_first_stage():
    method = build_method("sparsevlm", {"schedule": "matched"})
    for budget in (300, 192, 64):
        assert abs(method.schedule(576, budget, "retained", 32)[0] - budget) <= 1
    with pytest.raises(BudgetError, match="smallest feasible budget is 58"):
        method.schedule(576, 40, "layer_avg", 32)


# ----------------------------------------------------------------------------------- property 2: raters
def test_raters_mean_softmax_and_threshold():
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(50, 8, generator=g), torch.randn(9, 8, generator=g)
    m = rater_scores(v, t)
    p = torch.softmax(v.double() @ t.double().T, dim=1)  # softmax over the text tokens
    assert torch.allclose(m.double(), p.mean(0), atol=1e-6)
    assert m.sum().item() == pytest.approx(1.0, abs=1e-6)
    raters = rater_mask(v, t)
    assert torch.equal(raters, m > 1 / 9) and 0 < int(raters.sum()) < 9
    same = torch.ones(4, 8)  # identical suffix rows: every m_t = 1/L_t, nobody is above the mean
    assert rater_mask(v, same).all()
    assert rater_mask(v, t[:1]).all()  # one suffix token: m = 1, fallback to all


def test_raters_are_computed_once_and_kept_in_the_memo():
    method = build_method("sparsevlm", {})
    counts = method.schedule(576, 192, "layer_avg", 32)
    img = _image(t=7)
    plan = method.select(0, img, counts[0])
    raters = img.memo["sparsevlm_raters"]
    assert torch.equal(raters, rater_mask(img.signals["visual_embeddings"], img.signals["suffix_embeddings"]))
    nxt = _image(n=counts[0], t=7, seed=3)
    nxt.memo = img.memo
    del nxt.signals["visual_embeddings"]  # later stages need only the memo
    nxt.signals["suffix_attention"] = img.signals["suffix_attention"][:, plan.keep_idx]
    assert method.select(1, nxt, counts[1]).keep_idx.numel() == counts[1]
    assert nxt.memo["sparsevlm_raters"] is raters


# ----------------------------------------------------------------------------------- property 3: rater rows
@pytest.mark.parametrize("name,budget", [("llava", 192), ("qwen2_5_vl", 1 / 3)])
def test_rater_rows_equal_eager_output_attentions(name, budget):
    """Property 3: the engine's suffix_attention rows (sdpa model, no eager layer) equal eager
    `output_attentions` rows of the same layer on the same (pruned-so-far) input, every stage."""
    fam = family(name)
    inputs = fam.batches[1]
    first = int((inputs["input_ids"][0] == fam.models["sdpa"].config.image_token_id).nonzero()[0])
    got = {}
    for attn in ("sdpa", "eager"):
        model = fam.models[attn]
        vtprune.apply(model, "sparsevlm", budget)
        method = vtprune.session_of(model).method
        stock, seen = method.select, []

        def spy(stage, image, k, stock=stock, seen=seen):
            seen.append((image.n, image.signals["suffix_attention"].clone(), image.original_index.clone()))
            return stock(stage, image, k)

        method.select = spy
        try:
            with torch.no_grad():
                out = model(**inputs, output_attentions=attn == "eager")
        finally:
            vtprune.remove(model)
        got[attn] = (seen, out, method.stage_layers(6))
        assert model.config.text_config._attn_implementation == attn  # nothing switched to eager
    seen_sdpa, _, layers = got["sdpa"]
    seen_eager, out, _ = got["eager"]
    assert len(seen_sdpa) == 3
    for s, ((n, rows, orig), (n_e, _, orig_e)) in enumerate(zip(seen_sdpa, seen_eager, strict=True)):
        assert n == n_e and torch.equal(orig, orig_e)
        probs = out.attentions[layers[s] - 1][0].float().mean(0)  # layer ℓ = stage layer − 1, head mean
        t_s = rows.shape[0]
        eager = probs[-t_s:, first : first + n]  # question-span rows × this image's current candidates
        assert (rows - eager).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------- property 4: recycling
def test_recycle_sizes_formula():
    for n_del in range(1, 3000):
        m, c = recycle_sizes(n_del)
        assert m == math.floor(0.3 * n_del) + 1 and c == m // 10 + 1 and 1 <= c <= m <= n_del
    assert recycle_sizes(276) == (83, 9) and recycle_sizes(0) == (0, 0)


@pytest.mark.parametrize("m,c,seed", [(30, 3, 0), (83, 9, 1), (12, 2, 2), (1, 1, 3), (154, 16, 4)])
def test_dpc_knn_matches_naive_reference(m, c, seed):
    x = torch.randn(m, 12, generator=torch.Generator().manual_seed(seed)) * 3
    centres, labels = dpc_knn(x, c)
    want_c, want_l = _naive_dpc_knn(x, c)
    assert centres.tolist() == want_c and labels.tolist() == want_l
    assert len(set(centres.tolist())) == c
    assert torch.equal(labels[centres], torch.arange(c))


def test_dpc_knn_ties_are_deterministic():
    x = torch.ones(6, 4)  # all points identical: equal density, equal score
    centres, labels = dpc_knn(x, 2)
    assert centres.tolist() == [0, 1] and labels.tolist() == [0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("stage,n,total", [(0, 576, 309), (1, 309, 204), (2, 204, 113), (0, 576, 82)])
def test_select_keeps_topk_and_recycles_cluster_means(stage, n, total):
    """Property 4: m, c; every selected dropped token is in exactly one cluster; centres distinct dropped
    tokens; each merged token is the mean of its members at its centre's slot; the kept rows are unchanged."""
    method = build_method("sparsevlm", {})
    img = _image(n=n, seed=stage + n)
    plan = method.select(stage, img, total)
    k, c = split_count(n, total)
    rel = img.signals["suffix_attention"][
        rater_mask(img.signals["visual_embeddings"], img.signals["suffix_embeddings"])
    ]
    rel = rel.mean(0)
    order = torch.sort(rel, descending=True, stable=True).indices
    kept, dropped = order[:k], order[k:]
    m, c_rule = recycle_sizes(n - k)
    assert c == c_rule and k <= n - 1  # property 5: at least one token dropped
    chosen = dropped[:m].sort().values
    want_c, want_l = _naive_dpc_knn(img.features[chosen], c)
    centres = chosen[torch.tensor(want_c)]
    keep = plan.keep_idx
    assert keep.dtype == torch.long and torch.equal(keep, keep.unique()) and len(keep) == total == k + c
    assert set(keep.tolist()) == set(kept.tolist()) | set(centres.tolist())
    assert not set(kept.tolist()) & set(centres.tolist())
    labels = torch.tensor(want_l)
    for u, centre in enumerate(centres.tolist()):
        members = chosen[labels == u]
        slot = int((keep == centre).nonzero())
        assert torch.allclose(plan.new_feats[slot], img.features[members].mean(0), atol=1e-6)
        assert plan.weights[slot] == len(members)
    is_kept = torch.isin(keep, kept)
    assert torch.equal(plan.new_feats[is_kept], img.features[keep[is_kept]])
    assert plan.weights.sum() == k + m  # each chosen dropped token in exactly one cluster


def test_select_without_recycling_is_plain_topk():
    method = build_method("sparsevlm", {"recycle": False})
    img = _image(t=5)
    plan = method.select(0, img, 300)
    rel = img.signals["suffix_attention"][img.memo["sparsevlm_raters"]].mean(0)
    assert plan.new_feats is None and torch.equal(plan.keep_idx, stable_topk(rel, 300))
    assert method.merges is False and build_method("sparsevlm", {}).merges is True


def test_select_uses_the_split_its_schedule_chose():
    """k + c(n − k) can be equal for k and k + 1; select recovers the schedule's k, not just the total."""
    n = 100
    amb = next(k for k in range(1, n - 1) if stage_count(n, k)[1] == stage_count(n, k + 1)[1])
    total = stage_count(n, amb)[1]
    assert split_count(n, total) == (amb + 1, total - amb - 1)  # fallback: the larger k
    img = _image(n=n)
    rel = img.signals["suffix_attention"][
        rater_mask(img.signals["visual_embeddings"], img.signals["suffix_embeddings"])
    ]
    order = torch.sort(rel.mean(0), descending=True, stable=True).indices
    for k in (amb, amb + 1):
        method = build_method("sparsevlm", {})
        if k == amb:
            method._splits[(0, n, total)] = amb  # what `schedule` records for a table k_ℓ = amb
        keep = set(method.select(0, _image(n=n), total).keep_idx.tolist())
        assert len(keep) == total and set(order[:k].tolist()) <= keep
        assert len(keep - set(order[:k].tolist())) == total - k  # c = total − k recycled tokens


# ----------------------------------------------------------------------------------- property 5
def test_every_stage_drops_at_least_one_token():
    for n in range(2, 400):
        for k_l in (0, 1, n // 3, n - 1, n, n + 5):
            k, after = stage_count(n, k_l)
            assert 1 <= k <= n - 1 and after <= n


# ----------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", FAMILIES)
def test_realised_counts_on_tiny_models(name):
    """`last_run` reports retained = N and the layer average of the schedule's counts (6-layer models)."""
    fam = family(name)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    method = build_method("sparsevlm", {})
    with vtprune.pruned(model, method, BUDGETS[name]), torch.no_grad():
        model(**inputs)
        record = vtprune.last_run(model)
    for sample in record.samples:
        n = sample.n_visual
        budget = BUDGETS[name] if isinstance(BUDGETS[name], int) else max(1, _rhu(BUDGETS[name] * n))
        counts = method.schedule(n, budget, "layer_avg", 6)
        assert sample.visual_per_layer == _expected_per_layer(n, counts, method.stage_layers(6), 6)
        assert sample.retained_tokens == n
        assert sample.layer_avg_tokens == pytest.approx(layer_average(n, counts, method.stage_layers(6), 6))
        assert [len(ev.keep_idx) for ev in sample.events] == counts
        assert all(ev.merged for ev in sample.events)
    if name == "llava":
        assert record.samples[0].visual_per_layer == [576, 309, 204, 204, 113, 113]


def test_text_rows_unchanged_and_positions_non_decreasing():
    """Property 6 (batch of one, LLaVA): text rows entering each stage layer equal layer ℓ's output text rows;
    position ids of the pruned rows are non-decreasing and equal the representatives' original ids."""
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[1]
    vtprune.apply(model, "sparsevlm", 192)
    method = vtprune.session_of(model).method
    layers = model.model.language_model.layers
    outs, ins, handles = {}, {}, []
    for k in method.stage_layers(6):
        handles.append(layers[k - 1].register_forward_hook(lambda m, a, o, k=k: outs.__setitem__(k, o)))
        handles.append(
            layers[k].register_forward_pre_hook(
                lambda m, a, kw, k=k: ins.__setitem__(k, (a[0] if a else kw["hidden_states"], kw.get("position_ids"))),
                with_kwargs=True,
            )
        )
    try:
        with torch.no_grad():
            model(**inputs)
        record = vtprune.last_run(model)
    finally:
        for h in handles:
            h.remove()
        vtprune.remove(model)
    prefix, suffix = 3, 4
    for s, k in enumerate(method.stage_layers(6)):
        before = outs[k][0] if isinstance(outs[k], tuple) else outs[k]
        after, pos = ins[k]
        assert torch.equal(after[0, :prefix], before[0, :prefix])
        assert torch.equal(after[0, -suffix:], before[0, -suffix:])
        kept = record.samples[0].events[s].keep_idx
        assert after.shape[1] == prefix + len(kept) + suffix
        pos = pos.reshape(-1)  # LLaVA layers get explicit position_ids
        assert torch.all(pos[1:] >= pos[:-1])
        assert torch.equal(pos[prefix : prefix + len(kept)], prefix + kept)


# ----------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("name", FAMILIES)
def test_oracles_recycling(name):
    check_oracles(name, "sparsevlm", BUDGETS[name], {}, selection_only=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_oracles_recycling_off_is_selection_only(name):
    check_oracles(name, "sparsevlm", BUDGETS[name], {"recycle": False}, selection_only=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_oracles_reference_preset_reindex(name):
    record = check_oracles(
        name, "sparsevlm", BUDGETS[name], {"preset": "reference", "positions": "reindex"}, selection_only=False
    )
    assert record.positions == "reindex"


def test_recycle_reference_order_is_kept_then_recycled_in_cluster_order():
    gen = torch.Generator().manual_seed(3)
    feats, rel = torch.randn(40, 8, generator=gen), torch.rand(40, generator=gen)
    keep, _, weights, order = recycle(feats, rel, 12, recycle_sizes(28)[1])
    top = set(stable_topk(rel, 12).tolist())
    emitted = keep[order].tolist()
    assert sorted(order.tolist()) == list(range(len(keep)))
    assert emitted[:12] == sorted(top) and not top & set(emitted[12:])  # kept first, in candidate order


def test_reference_preset_emits_recycled_tokens_last_with_contiguous_ids():
    """Property of the reference order: after every stage the LM rows of the image are [kept in current order,
    recycled in cluster order] (replayed from the recorded plans), with contiguous position ids."""
    from families import recorded_plans

    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[1]
    seen = {}

    def capture(module, args, kwargs):
        seen["positions"] = kwargs["position_ids"]

    last = model.model.language_model.layers[-1]
    with vtprune.pruned(model, "sparsevlm", BUDGETS["llava"], preset="reference", positions="reindex"):
        handle = last.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with recorded_plans(model) as plans, torch.no_grad():
                model(**inputs)
        finally:
            handle.remove()
        record = vtprune.last_run(model)
    current = torch.arange(record.samples[0].n_visual)
    assert any(not torch.equal(p.order, torch.arange(len(p.order))) for _, p in plans), "order never differs"
    for _, plan in plans:
        assert plan.order is not None
        current = current[plan.keep_idx][plan.order]
    rows = record.sequence_index[0]
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    visual = rows[(rows >= start) & (rows < start + record.samples[0].n_visual)] - start
    assert torch.equal(visual, current)
    pos = seen["positions"][0]
    assert torch.equal(pos, torch.arange(pos.numel()))


def test_oracles_matched_schedule():
    record = check_oracles("llava", "sparsevlm", 200, {"schedule": "matched"}, selection_only=False, bypass=False)
    assert abs(record.samples[0].layer_avg_tokens - 200) <= 0.5


# ----------------------------------------------------------------------------------- options and errors
def test_option_errors():
    with pytest.raises(VtpruneError, match="does not recycle"):
        build_method("sparsevlm", {"version": "2.0", "recycle": True})
    with pytest.raises(VtpruneError, match="recycle"):
        build_method("sparsevlm", {"recycle": "yes"})
    with pytest.raises(VtpruneError, match="version"):
        build_method("sparsevlm", {"version": "3"})
    with pytest.raises(VtpruneError, match="schedule"):
        build_method("sparsevlm", {"schedule": "exact"})
    with pytest.raises(VtpruneError, match="preset"):
        build_method("sparsevlm", {"preset": "paper"})


def test_apply_fails_early_on_an_infeasible_llava_budget():
    model = family("llava").models["sdpa"]
    with pytest.raises(BudgetError, match="192"):
        vtprune.apply(model, "sparsevlm", 100)
    assert vtprune.session_of(model) is None


# =================================================================================== SparseVLM+ (version="2.0")
V2 = {"version": "2.0"}


def _naive_gravity(p_rows, q_cols, theta: float, d: int, sections=None) -> torch.Tensor:
    """W[t, j] = (2/√d)·Σ_i cos((p_t − q_j)·θ_i) with Python loops; p_rows / q_cols: lists of ids (ints, or
    (t, h, w) tuples for M-RoPE where pair i uses the id of its section)."""
    half = d // 2
    sec = [0] * half if sections is None else [s for s, c in enumerate(sections) for _ in range(c)]
    out = torch.zeros(len(p_rows), len(q_cols), dtype=torch.float64)
    for a, p in enumerate(p_rows):
        for b, q in enumerate(q_cols):
            total = 0.0
            for i in range(half):
                pi, qi = (p, q) if sections is None else (p[sec[i]], q[sec[i]])
                total += math.cos((pi - qi) * theta ** (-2 * i / d))
            out[a, b] = 2 / math.sqrt(d) * total
    return out


def _spy(model, capture):
    """Wrap the attached method's `select` and `relevance` to record, per call: n, original indices, signals,
    raters, relevance, kept heads and the plan."""
    method = vtprune.session_of(model).method
    stock_select, stock_rel, seen = method.select, method.relevance, []

    def relevance(image):
        rel = stock_rel(image)
        seen[-1]["rel"] = rel.clone()
        return rel

    def select(stage, image, k):
        seen.append({"stage": stage, "n": image.n, "orig": image.original_index.clone()})
        seen[-1]["signals"] = {name: image.signals[name].clone() for name in capture if name in image.signals}
        plan = stock_select(stage, image, k)
        seen[-1]["raters"] = image.memo["sparsevlm_raters"].clone()
        seen[-1]["heads"] = image.memo.get("sparsevlm_heads", [None])[-1]
        seen[-1]["keep"] = plan.keep_idx.clone()
        seen[-1]["plan"] = plan
        return plan

    method.select, method.relevance = select, relevance
    return method, seen


def test_v2_signals_are_engine_signals():
    method = build_method("sparsevlm", V2)
    wanted = method.signals(0)
    assert {"suffix_attention_heads", "suffix_rope_gravity"} <= wanted and "suffix_attention" not in wanted
    assert {"suffix_attention_heads", "suffix_rope_gravity"} <= LLM_SIGNALS
    assert method.merges is False and build_method("sparsevlm", {}).merges is True


# ----------------------------------------------------------------------------------- gravity W
@pytest.mark.parametrize("d,theta", [(16, 10000.0), (128, 10000.0), (128, 1e6)])
def test_rope_gravity_equals_naive_loops_1d(d, theta):
    g = torch.Generator().manual_seed(d)
    p = torch.randint(0, 3000, (5,), generator=g)
    q = torch.cat([torch.randint(0, 3000, (6,), generator=g), p[:2]])  # includes p − q = 0
    want = _naive_gravity(p.tolist(), q.tolist(), theta, d)
    got = rope_gravity(p, q, theta, d)
    assert got.shape == (5, 8) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    assert got[0, 6].item() == pytest.approx(2 * (d // 2) / math.sqrt(d), rel=1e-6)  # W at distance 0


def test_rope_gravity_equals_naive_loops_mrope():
    """M-RoPE (Qwen2.5-VL-7B sections 16 / 24 / 24 of 64 pairs): pair i uses the t, h or w id of its section."""
    g = torch.Generator().manual_seed(3)
    p, q = torch.randint(0, 60, (3, 4), generator=g), torch.randint(0, 60, (3, 7), generator=g)
    want = _naive_gravity(p.T.tolist(), q.T.tolist(), 1e6, 128, (16, 24, 24))
    got = rope_gravity(p, q, 1e6, 128, (16, 24, 24))
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sections"):
        rope_gravity(p, q, 1e6, 128, (16, 24, 16))


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_rope_gravity_is_all_ones_query_key_through_the_models_rotary(name):
    """W equals scaling · (RoPE(1)_p · RoPE(1)_q) computed with the model's own rotary module and
    `apply_rotary_pos_emb` (M-RoPE sections included), at the adapter's `rotary_spec`."""
    from vtprune.models import adapter_for

    model = family(name).models["sdpa"]
    spec = adapter_for(model).rotary_spec()
    lm = model.model.language_model
    g = torch.Generator().manual_seed(0)
    if name == "qwen2_5_vl":  # the rotary module recomposes the t / h / w sections into (cos, sin)
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb as rope

        assert spec.sections == tuple(model.config.text_config.rope_parameters["mrope_section"])
        pos = torch.randint(0, 50, (3, 1, 20), generator=g)
    else:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as rope

        assert spec.sections is None
        pos = torch.randint(0, 700, (1, 20), generator=g)
    ones = torch.ones(1, 1, 20, spec.head_dim)
    cos, sin = lm.rotary_emb(ones, position_ids=pos)
    r = rope(ones, ones, cos, sin)[0][0, 0].double()  # (20, d_h): all-ones vectors after RoPE
    want = (r @ r.T) / math.sqrt(spec.head_dim)
    got = rope_gravity(pos[..., 0, :], pos[..., 0, :], spec.theta, spec.head_dim, spec.sections)
    assert torch.allclose(got.double(), want, atol=1e-4)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_engine_gravity_signal_equals_naive_loops(name):
    """`suffix_rope_gravity` per image at every stage (batch of two, left padding; keep ids) equals W from
    naive loops over the original position ids of the question-span rows and of the current candidates."""
    fam = family(name)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if name == "qwen2_5_vl":
        pos, _ = model.model.get_rope_index(
            ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=mask,
        )  # (3, B, L)
        sections = tuple(model.config.text_config.rope_parameters["mrope_section"])
    else:
        pos, sections = ((mask.cumsum(1) - 1).clamp(min=0) * mask)[None], None
    d = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    vtprune.apply(model, "sparsevlm", BUDGETS[name], **V2)
    _, seen = _spy(model, {"suffix_rope_gravity"})
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        vtprune.remove(model)
    assert len(seen) == 6  # 3 stages × 2 samples, sample 0 first at each stage
    for call_idx, call in enumerate(seen):
        b = call_idx % 2
        image_rows = (ids[b] == model.config.image_token_id).nonzero().flatten()
        w = call["signals"]["suffix_rope_gravity"]
        t_s = w.shape[0]
        suffix_rows = torch.arange(ids.shape[1] - t_s, ids.shape[1])
        assert int(image_rows[-1]) + 1 == int(suffix_rows[0])  # the question span starts after the image

        def as_ids(rows, b=b):
            return [tuple(pos[:, b, r].tolist()) if sections else int(pos[0, b, r]) for r in rows]

        want = _naive_gravity(as_ids(suffix_rows), as_ids(image_rows[call["orig"]]), 10000.0, d, sections)
        assert w.shape == (t_s, call["n"])
        assert torch.allclose(w.double(), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- head selection
def test_heads_kept_rule():
    assert heads_kept(32) == 14  # Source: LLaVA-7B
    assert heads_kept(28) == 12 and heads_kept(4) == 2 and heads_kept(40) == 18
    assert heads_kept(1) == 1 and heads_kept(2) == 1 and heads_kept(3) == 1


def _naive_relevance(attn, w, raters):
    """Python loops: G_h[t, j] = A_h[t, j] / W[t, j] over the raters; heads with the largest Σ G (ties to the
    lower head); rel_j = mean over kept heads and raters.  attn (H, T_s, n), w (T_s, n), raters (T_s,) bool."""
    h_all, _, n = attn.shape
    rts = [t for t in range(attn.shape[1]) if raters[t]]
    g = [[[float(attn[h, t, j]) / float(w[t, j]) for j in range(n)] for t in rts] for h in range(h_all)]
    totals = [sum(sum(row) for row in g[h]) for h in range(h_all)]
    kept = sorted(sorted(range(h_all), key=lambda h: (-totals[h], h))[: heads_kept(h_all)])
    rel = [sum(g[h][t][j] for h in kept for t in range(len(rts))) / (len(kept) * len(rts)) for j in range(n)]
    return torch.tensor(rel, dtype=torch.float64), kept


def test_gravity_relevance_matches_naive_loops():
    g = torch.Generator().manual_seed(7)
    attn = torch.rand(8, 5, 30, generator=g)
    w = torch.rand(5, 30, generator=g) * 4 + 0.5
    raters = torch.tensor([True, False, True, True, False])
    rel, kept = gravity_relevance(attn, w, raters)
    want, want_kept = _naive_relevance(attn, w, raters)
    assert kept.tolist() == want_kept and len(want_kept) == heads_kept(8) == 4
    assert torch.allclose(rel.double(), want, rtol=1e-5, atol=1e-7)


def test_v2_select_is_plain_topk_of_gravity_relevance_without_recycling():
    """No recycling in v2.0: the plan is the stable top-k of the corrected relevance, no new_feats."""
    g = torch.Generator().manual_seed(2)
    img = _image(n=576, t=6)
    img.signals["suffix_attention_heads"] = torch.rand(32, 6, 576, generator=g)
    img.signals["suffix_rope_gravity"] = torch.rand(6, 576, generator=g) + 0.5
    method = build_method("sparsevlm", V2)
    counts = method.schedule(576, 192, "layer_avg", 32)
    plan = method.select(0, img, counts[0])
    raters = rater_mask(img.signals["visual_embeddings"], img.signals["suffix_embeddings"])
    rel, kept = gravity_relevance(img.signals["suffix_attention_heads"], img.signals["suffix_rope_gravity"], raters)
    assert plan.new_feats is None and plan.weights is None
    assert torch.equal(plan.keep_idx, stable_topk(rel, 300)) and len(kept) == 14
    assert torch.equal(img.memo["sparsevlm_heads"][0], kept)


def test_v2_gravity_and_head_selection_equal_naive_eager_reimplementation():
    """Tiny LLaVA, sdpa (no layer switched to eager): at every stage the per-head signal equals eager
    `output_attentions` rows of layer ℓ (same pruned input), and the method's relevance, kept heads and keep
    list equal a naive re-implementation from those eager probabilities with W from Python loops."""
    fam = family("llava")
    inputs = fam.batches[1]
    first = int((inputs["input_ids"][0] == fam.models["sdpa"].config.image_token_id).nonzero()[0])
    runs = {}
    for attn in ("sdpa", "eager"):
        model = fam.models[attn]
        vtprune.apply(model, "sparsevlm", 192, **V2)
        method, seen = _spy(model, {"suffix_attention_heads", "suffix_rope_gravity"})
        try:
            with torch.no_grad():
                out = model(**inputs, output_attentions=attn == "eager")
        finally:
            vtprune.remove(model)
        assert model.config.text_config._attn_implementation == attn
        runs[attn] = (seen, out, method.stage_layers(6))
    seen, _, layers = runs["sdpa"]
    seen_eager, out, _ = runs["eager"]
    assert [c["n"] for c in seen] == [576, 300, 200]
    d = 16
    length = inputs["input_ids"].shape[1]
    for s, (call, call_e) in enumerate(zip(seen, seen_eager, strict=True)):
        assert torch.equal(call["orig"], call_e["orig"])
        heads = call["signals"]["suffix_attention_heads"]  # (H, T_s, n)
        t_s, n = heads.shape[1:]
        eager = out.attentions[layers[s] - 1][0].float()  # (H, L_s, L_s) of layer ℓ = stage layer − 1
        eager = eager[:, -t_s:, first : first + n]
        assert heads.shape[0] == 4 and (heads - eager).abs().max() <= 1e-5
        w = _naive_gravity(list(range(length - t_s, length)), (first + call["orig"]).tolist(), 10000.0, d)
        rel, kept = _naive_relevance(eager.double(), w, call["raters"])
        assert call["heads"].tolist() == kept
        assert torch.allclose(call["rel"].double(), rel, rtol=1e-3, atol=1e-5)
        assert torch.equal(call["keep"], stable_topk(rel, len(call["keep"])))


def test_both_suffix_signals_share_one_attention_computation(monkeypatch):
    """A method asking for suffix_attention and suffix_attention_heads gets one rows_attention call per stage,
    and the head mean of the per-head signal is bit-identical to suffix_attention."""
    from vtprune.engine import signals as sig

    calls = []
    stock = sig.rows_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("heads", False))
        return stock(*args, **kwargs)

    monkeypatch.setattr(sig, "rows_attention", counting)
    fam = family("llava")
    model = fam.models["sdpa"]
    vtprune.apply(model, "sparsevlm", 192, **V2)
    method, seen = _spy(model, {"suffix_attention", "suffix_attention_heads"})
    method.signals = lambda stage: frozenset(
        {"suffix_attention", "suffix_attention_heads", "suffix_rope_gravity", "suffix_embeddings", "visual_embeddings"}
    )
    try:
        with torch.no_grad():
            model(**fam.batches[2])
    finally:
        vtprune.remove(model)
    assert calls == [True, True, True]
    for call in seen:
        sig_heads, mean = call["signals"]["suffix_attention_heads"], call["signals"]["suffix_attention"]
        assert torch.equal(sig_heads.mean(0), mean)


# ----------------------------------------------------------------------------------- v2.0 schedules
@pytest.mark.parametrize("label", [192, 128, 96, 64])
def test_v2_schedule_equals_spec_table(label):
    """v2.0 column: 576 → k_ℓ (no recycling) for every row, any budget_mode."""
    method = build_method("sparsevlm", V2)
    for mode in ("layer_avg", "retained"):
        assert method.schedule(576, label, mode, 32) == list(ROWS_V2[label])
    assert ROWS_V2 == {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}


def test_v2_schedules_other_models():
    """NeXT 640 / 320 of 2880 → rows 128 / 64 (k_ℓ = 5·k_ℓ^LLaVA), 160 → error; Qwen (28 layers) ρ = 1/3, 2/9,
    1/9 → rows 192 / 128 / 64 with k_ℓ = round_half_up(N·k_ℓ/576)."""
    method = build_method("sparsevlm", V2)
    assert method.schedule(2880, 640, "layer_avg", 32) == [5 * k for k in ROWS_V2[128]]
    assert method.schedule(2880, 320, "layer_avg", 32) == [5 * k for k in ROWS_V2[64]]
    with pytest.raises(BudgetError, match="270"):
        method.schedule(2880, 160, "layer_avg", 32)
    for n in (391, 1036):
        for rho, row in ((1 / 3, 192), (2 / 9, 128), (1 / 9, 64)):
            counts = method.schedule(n, _rhu(rho * n), "layer_avg", 28)
            assert counts == [max(1, _rhu(n * k / 576)) for k in ROWS_V2[row]]


@pytest.mark.parametrize("n,budget,layers", [(576, 192, 32), (576, 100, 32), (2880, 640, 32), (1036, 345, 28)])
def test_v2_matched_schedule_reaches_the_layer_average(n, budget, layers):
    method = build_method("sparsevlm", {**V2, "schedule": "matched"})
    counts = method.schedule(n, budget, "layer_avg", layers)
    assert abs(layer_average(n, counts, method.stage_layers(layers), layers) - budget) <= 0.5
    with pytest.raises(BudgetError, match="smallest feasible budget is 55"):
        method.schedule(576, 40, "layer_avg", 32)  # 3·576/32 = 54 plus the single kept tokens


@pytest.mark.parametrize("name", FAMILIES)
def test_v2_end_to_end_counts_and_no_recycling(name):
    """Realised per-layer counts follow the v2.0 schedule; no event merges (no new_feats)."""
    fam = family(name)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    method = build_method("sparsevlm", V2)
    vtprune.apply(model, method, BUDGETS[name])
    _, seen = _spy(model, set())
    try:
        with torch.no_grad():
            model(**inputs)
        record = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    assert all(call["plan"].new_feats is None for call in seen)
    for sample in record.samples:
        n = sample.n_visual
        budget = BUDGETS[name] if isinstance(BUDGETS[name], int) else max(1, _rhu(BUDGETS[name] * n))
        counts = method.schedule(n, budget, "layer_avg", 6)
        assert sample.visual_per_layer == _expected_per_layer(n, counts, method.stage_layers(6), 6)
        assert not any(ev.merged for ev in sample.events)
    if name == "llava":
        assert record.samples[0].visual_per_layer == [576, 300, 200, 200, 118, 118]


@pytest.mark.parametrize("name", FAMILIES)
def test_oracles_v2_selection_only(name):
    check_oracles(name, "sparsevlm", BUDGETS[name], V2, selection_only=True)
    assert family(name).models["sdpa"].config.text_config._attn_implementation == "sdpa"


def test_rotary_spec_refuses_scaled_rope():
    """The gravity needs plain RoPE frequencies: other rope_types (and a rotary module that disagrees with the
    config) are refused with an error naming them, at the first pruned prefill."""
    from vtprune.models import adapter_for

    model = family("llava").models["sdpa"]
    tc = model.config.text_config
    saved = dict(tc.rope_parameters)
    try:
        tc.rope_parameters = {**saved, "rope_type": "linear", "factor": 2.0}
        with pytest.raises(UnsupportedInputError, match="rope_type='linear'"):
            adapter_for(model).rotary_spec()
        vtprune.apply(model, "sparsevlm", 192, **V2)
        try:
            with pytest.raises(UnsupportedInputError, match="rope_type"), torch.no_grad():
                model(**family("llava").batches[1])
        finally:
            vtprune.remove(model)
        tc.rope_parameters = {**saved, "rope_theta": 5e5}
        with pytest.raises(UnsupportedInputError, match="inv_freq"):
            adapter_for(model).rotary_spec()
    finally:
        tc.rope_parameters = saved
    assert adapter_for(model).rotary_spec().theta == 10000.0
