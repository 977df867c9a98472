"""ViTCoP (spec vitcop.md): every "Properties a test can check" item, naive references of VIC and of the
Stage-II quota/merge rule, the budget table, LLaVA-NeXT crop geometry, and the shared oracles
(`families.check_oracles`, merging method) on the three tiny 6-layer families.

Budgets on the 6-layer test models: L_s = 2 and the derived L_d = round(22·6/32) = 4, so
n̄ = (2·n1 + 2·R2 + 2·R3)/6. A ratio of 0.3 gives n1/R2/R3 = 270/206/41 on LLaVA (576), 29/22/4 and 22/16/3
on NeXT (64, 48) and 11/8/2, 6/5/1 on Qwen (24, 12): every stage prunes on every sample (the Qwen 0.5
case has a stage that prunes nobody in the 12-token image). The largest feasible n̄ on 6 layers is
≈ 0.73·N (n1 = R2 = N, R3 = N/5), the smallest on 576 tokens is 16.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from families import check_oracles, family, grid_layout

import vtprune
from vtprune import hf_compat as hf
from vtprune.engine import signals as sig
from vtprune.errors import BudgetError, VtpruneError
from vtprune.methods import ImageTokens, build_method
from vtprune.methods.vitcop import (
    auto_cutoff,
    cluster_count,
    cluster_quotas,
    crop_geometry,
    deep_layer,
    key_distances,
    merge_groups,
    padded_tile_grid,
    realised_layer_avg,
    stage1_keep,
    stage2_plan,
    vic,
    vic_labels,
    vitcop_plan,
)


def _grid_image(grids=((24, 24),), d=16, seed=0, n_keys=32, pads=None):
    """ImageTokens over crops of `grids` (raster order per crop) with random features and vision signals."""
    g = torch.Generator().manual_seed(seed)
    coords, crop, n = grid_layout(grids)
    signals = {
        "cls_attention": torch.rand(n, generator=g).softmax(0),
        "vision_keys": torch.randn(n, n_keys, generator=g) * 3,
    }
    return ImageTokens(
        torch.randn(n, d, generator=g), coords, crop, list(grids), torch.arange(n), signals, seed
    )


# ----------------------------------------------------------------------------------- budgets (property 1)


@pytest.mark.parametrize(
    "budget,n1,c,r2,r3,nbar",
    [(192, 288, 51, 253, 51, 192.06), (128, 230, 34, 165, 33, 127.81), (64, 172, 20, 77, 15, 63.56)],
)
def test_schedule_reproduces_spec_table(budget, n1, c, r2, r3, nbar):
    method = build_method("vitcop", {})
    method.bind(32)
    assert method.schedule(576, budget, "layer_avg", 32) == [n1, r2, r3]
    assert vitcop_plan(576, budget, 32, 2, 22) == (n1, c, r2, r3)
    assert cluster_count(576, n1) == c
    assert round(realised_layer_avg(n1, r2, r3, 32, 2, 22), 2) == nbar
    assert abs(realised_layer_avg(n1, r2, r3, 32, 2, 22) - budget) < 0.5


def test_schedule_solves_the_equation_for_any_budget():
    """R2 from the spec's equation, R3 = round(R2/5), 1 ≤ R3 ≤ R2 ≤ n1 < N, R2 ≥ C + 1; n̄ close to B."""
    for n, layers in ((576, 32), (2880, 32), (1000, 28), (576, 6), (64, 6)):
        l_s, l_d = 2, deep_layer(layers)
        for budget in range(1, n, 1 if n < 1000 else 7):
            plan = vitcop_plan(n, budget, layers, l_s, l_d)
            if plan is None:
                continue
            n1, c, r2, r3 = plan
            assert 1 <= r3 <= r2 <= n1 <= n and r2 >= c + 1 and r3 == math.floor(r2 / 5 + 0.5)
            if 0.2 * n <= budget <= 0.5 * n:  # no fallback here: n̄ within 1.5 tokens of B (the spec's
                # formula uses v·N for n1 = int(v·N), plus the rounding of R2 and R3)
                assert abs(realised_layer_avg(n1, r2, r3, layers, l_s, l_d) - budget) <= 1.5


def test_schedule_feasibility_errors_name_the_limit():
    method = build_method("vitcop", {})
    method.bind(6)
    with pytest.raises(BudgetError, match="smallest feasible budget is 16"):
        method.schedule(576, 15, "layer_avg", 6)
    assert method.schedule(576, 16, "layer_avg", 6)[2] >= 1
    with pytest.raises(BudgetError, match="largest feasible budget below 576 is 422"):
        method.schedule(576, 500, "layer_avg", 6)
    assert method.schedule(576, 422, "layer_avg", 6) == [576, 575, 115]  # v raised to 1: Stage I keeps all
    with pytest.raises(BudgetError, match="retained"):
        method.schedule(576, 64, "retained", 6)
    assert method.schedule(576, 576, "layer_avg", 6) == [576, 576, 576]
    with pytest.raises(BudgetError):  # apply-time check on LLaVA
        vtprune.apply(family("llava").models["sdpa"], "vitcop", 8)


def test_layers_and_options():
    assert (deep_layer(32), deep_layer(28), deep_layer(6)) == (22, 19, 4)
    for depth, want in ((32, (2, 22)), (28, (2, 19)), (6, (2, 4))):
        m = build_method("vitcop", {})
        m.bind(depth)
        assert m.layers() == want and [str(s) for s in m.stages()] == ["vision", f"llm:{want[0]}", f"llm:{want[1]}"]
    m = build_method("vitcop", {"l_s": 1, "l_d": 5})
    m.bind(6)
    assert [str(s) for s in m.stages()] == ["vision", "llm:1", "llm:5"]
    with pytest.raises(VtpruneError):
        m.validate(5)
    with pytest.raises(VtpruneError):
        build_method("vitcop", {"l_s": 3, "l_d": 3}).validate(6)
    assert (
        m.signals(0) == {"cls_attention", "vision_keys"}
        and "key_norms" in m.signals(1)
        and m.signals(2) == {"key_norms"}
    )
    ref = build_method("vitcop", {"preset": "reference"})
    assert ref.config.merge == "code" and ref.config.stage3_positions == "code"
    assert build_method("vitcop", {}).config.stage3_positions == "orig"
    for bad in (
        {"preset": "reference", "merge": "mean"},
        {"merge": "sum"},
        {"d_c": "median"},
        {"d_c": -1.0},
        {"stage3_positions": "x"},
        {"r3_ratio": 0.0},
        {"v": 1.5},
        {"l_d": 0},
    ):
        with pytest.raises(VtpruneError):
            build_method("vitcop", bad)


# ------------------------------------------------------------------------------------- Stage I + geometry


def test_stage1_single_crop_is_stable_topk():
    img = _grid_image()
    img.signals["cls_attention"] = torch.tensor([1.0, 0.5] * 288)  # ties: the lowest indices win
    m = build_method("vitcop", {})
    plan = m.select(0, img, 100)
    assert plan.new_feats is None and plan.keep_idx.tolist() == list(range(0, 200, 2))
    img = _grid_image(seed=3)
    want = torch.sort(img.signals["cls_attention"], descending=True, stable=True).indices[:288].sort().values
    assert torch.equal(m.select(0, img, 288).keep_idx, want)


def test_next_tile_units_positions_and_per_crop_quotas():
    """Base 4×4 + tile area 6×8 (the unpadded rows 1..6 of 2×2 tiles of 4×4, as on the tiny NeXT model)."""
    img = _grid_image(grids=((4, 4), (6, 8)))
    unit, pos = crop_geometry(img.coords, img.crop, img.grids)
    assert unit[:16].tolist() == [0] * 16
    rc = img.coords[16:]
    full_r = rc[:, 0] + 1  # (8 − 6)//2 = 1 padding row cut at the top
    assert torch.equal(unit[16:], 1 + (full_r // 4) * 2 + rc[:, 1] // 4)
    assert torch.allclose(pos[16:], torch.stack([full_r / 8.0, rc[:, 1] / 8.0], 1))
    assert torch.allclose(pos[:16], img.coords[:16].float() / 4)
    # the spec's LLaVA-NeXT example: 24-px tiles, a 2×2 tile grid unpadded to 40 rows
    coords = torch.tensor([[0, 0], [39, 47]])
    u, p = crop_geometry(coords, torch.tensor([1, 1]), [(24, 24), (40, 48)])
    assert u.tolist() == [1, 4] and torch.allclose(p, torch.tensor([[4 / 48, 0.0], [43 / 48, 47 / 48]]))
    # quotas: 16, 12, 12, 12, 12 valid tokens; n1 = 20 -> largest remainder 5, 4, 4, 4, 3 (ties to earlier)
    keep = stage1_keep(img.signals["cls_attention"], unit, 20)
    counts = torch.bincount(unit[keep], minlength=5).tolist()
    assert counts == [5, 4, 4, 4, 3]
    for u_ in range(5):
        members = (unit == u_).nonzero().flatten()
        top = members[torch.sort(img.signals["cls_attention"][members], descending=True, stable=True).indices]
        assert sorted(keep[unit[keep] == u_].tolist()) == sorted(top[: counts[u_]].tolist())


def test_stage1_uses_engine_tile_views_when_given():
    img = _grid_image(grids=((4, 4), (6, 8)))
    img.tile = (torch.arange(64) >= 40).long()  # two arbitrary views of 40 and 24 tokens
    keep = build_method("vitcop", {}).select(0, img, 16).keep_idx
    assert int((keep < 40).sum()) == 10 and int((keep >= 40).sum()) == 6  # 16·40/64 = 10, 16·24/64 = 6


def test_tile_grid_from_engine_tiles_matches_anyres_geometry():
    """On the tiny NeXT model (4×4 tiles): views = the engine's `image.tile`; VIC positions over the padded
    anyres grid, ((tile_row·s + r)/(s·n_rows), (tile_col·s + c)/(s·n_cols)), with n_rows × n_cols and the
    unpadding offset taken from transformers' own geometry. Image 2 (112×60) uses 2×2 tiles of which
    unpadding cuts 2 of 8 columns on each side, so ⌈w/s⌉ would be wrong there."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    f = family("llava_next")
    model, inputs = f.models["sdpa"], f.batches[2]
    cfg = model.config
    vtprune.apply(model, "vitcop", 0.3)
    method = vtprune.session_of(model).method
    seen = []
    stock = method.select

    def spy(stage, image, k):
        if stage == 0:
            seen.append((image.coords, image.crop, image.grids, getattr(image, "tile", None)))
        return stock(stage, image, k)

    method.select = spy
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        del method.select
        vtprune.remove(model)
    assert len(seen) == 2
    for (coords, crop, grids, tile), size in zip(seen, inputs["image_sizes"].tolist(), strict=True):
        assert tile is not None, "the engine must give LLaVA-NeXT candidates their CLIP view (image.tile)"
        s = grids[0][0]
        nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        (h, w) = grids[1]
        pad = torch.tensor([(nph * s - h) // 2, (npw * s - w) // 2])
        unit, pos = crop_geometry(coords, crop, grids, tile)
        assert torch.equal(unit, tile)
        full = coords[crop == 1] + pad
        assert torch.equal(tile[crop == 1] - 1, (full[:, 0] // s) * npw + full[:, 1] // s)
        assert torch.allclose(pos[crop == 1], full.float() / torch.tensor([nph * s, npw * s]).float())
        assert torch.allclose(pos[crop == 0], coords[crop == 0].float() / s)


def test_padded_tile_grid_cases():
    """Row cut (2×2 tiles, 1 row each side), column cut by more than a tile (1×4 tiles: one tile row, 3
    columns cut → first visible tile 1), a 3×1 grid cut to its middle tile row, and the uncut grid."""

    def area(n_rows, n_cols, s, cut_rows, cut_cols):
        r, c = torch.meshgrid(torch.arange(n_rows * s), torch.arange(n_cols * s), indexing="ij")
        keep = (r >= cut_rows) & (r < n_rows * s - cut_rows) & (c >= cut_cols) & (c < n_cols * s - cut_cols)
        rr, cc = r[keep], c[keep]
        a = (rr // s) * n_cols + cc // s
        return torch.stack([rr - cut_rows, cc - cut_cols], 1), a, n_rows * s - 2 * cut_rows

    for n_rows, n_cols, s, cut_r, cut_c in (
        (2, 2, 4, 1, 0),
        (1, 4, 4, 0, 5),
        (3, 1, 4, 5, 0),
        (2, 3, 4, 0, 0),
        (2, 2, 4, 0, 2),
    ):
        rc, a, h = area(n_rows, n_cols, s, cut_r, cut_c)
        assert padded_tile_grid(rc, a, h, s) == (n_rows, n_cols)


# ------------------------------------------------------------------------------------------ VIC (prop. 3)


def _naive_vic(x, pos, n_centres, d_c, tau):
    """The spec pseudo-code, line by line, in plain Python (float64 on the same fp32 distances)."""
    n = len(x)
    dist = key_distances(x).double().tolist()
    rho = [sum(math.exp(-((dist[i][j] / d_c) ** 2)) for j in range(n)) for i in range(n)]
    rho = torch.tensor(rho).float().tolist()  # the vectorised code compares fp32 densities
    delta, nn = [], []
    for i in range(n):
        best, arg = math.inf, -1
        for j in range(n):
            dp = math.sqrt(sum((float(pos[i][k]) - float(pos[j][k])) ** 2 for k in range(2)) + 1e-8)
            if j != i and rho[j] >= rho[i] and dp <= tau and dist[i][j] < best:
                best, arg = dist[i][j], j
        delta.append(best)
        nn.append(arg)
    gamma = [rho[i] * delta[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-gamma[i], i))[:n_centres]
    label = [-1] * n
    for c, i in enumerate(centres):
        label[i] = c
    while True:
        new = [label[nn[i]] if label[i] == -1 and nn[i] >= 0 and label[nn[i]] != -1 else label[i] for i in range(n)]
        if new == label:
            break
        label = new
    return label, nn, centres


@pytest.mark.parametrize("seed,tau,n_centres", [(0, 0.6, 5), (1, 0.3, 3), (2, 0.15, 8), (3, math.inf, 4)])
def test_vic_matches_naive_and_label_invariants(seed, tau, n_centres):
    g = torch.Generator().manual_seed(seed)
    h, w = 6, 7
    keep = torch.randperm(h * w, generator=g)[:30].sort().values
    coords = torch.stack([keep // w, keep % w], 1)
    pos = coords.float() / torch.tensor([h, w]).float()
    x = torch.randn(30, 12, generator=g) * 2
    out = vic(x, pos, n_centres, 4.0, tau)
    labels = out["labels"]
    want, nn, centres = _naive_vic(x, pos, n_centres, 4.0, tau)
    assert labels.tolist() == want and out["nn"].tolist() == nn and out["centres"].tolist() == centres
    # spec property 3: centres 0..C−1 distinct; every other label is its nn's label or −1
    assert labels[out["centres"]].tolist() == list(range(n_centres))
    others = torch.ones(30, dtype=torch.bool)
    others[out["centres"]] = False
    for i in others.nonzero().flatten().tolist():
        assert labels[i] == -1 or (out["nn"][i] >= 0 and labels[i] == labels[out["nn"][i]])


def test_vic_infinite_tau_single_centre_labels_everything_zero():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 8, generator=g)
    pos = torch.rand(40, 2, generator=g)
    out = vic(x, pos, 1, 3.0, math.inf)
    assert len(set(out["rho"].tolist())) == 40  # no density ties
    assert out["labels"].tolist() == [0] * 40


def test_vic_per_crop_labels_and_auto_cutoff():
    img = _grid_image(grids=((4, 4), (6, 8)), seed=5)
    _, pos = crop_geometry(img.coords, img.crop, img.grids)
    labels = vic_labels(img.signals["vision_keys"], pos, img.crop, 6, "auto", 0.6)
    # C = 6 split 16 : 48 -> 2 + 4 centres; crop 0 uses ids 0..1, crop 1 ids 2..5, unreached −1 / −2
    assert set(labels[:16].tolist()) <= {0, 1, -1} and {0, 1} <= set(labels[:16].tolist())
    assert set(labels[16:].tolist()) <= {2, 3, 4, 5, -2} and {2, 3, 4, 5} <= set(labels[16:].tolist())
    dist = key_distances(img.signals["vision_keys"][:16])
    off = dist[~torch.eye(16, dtype=torch.bool)].double().numpy()
    assert auto_cutoff(dist) == pytest.approx(float(np.quantile(off, 0.02)), rel=1e-6)


# --------------------------------------------------------------------------------- Stage II (props 4, 5)


def _naive_stage2(feats, a, labels, r2, merge):
    """Spec Stage II in plain Python: -> (sorted keep list, {index: feature})."""
    n = len(labels)
    clusters = sorted(set(labels))
    members = {c: [i for i in range(n) if labels[i] == c] for c in clusters}
    s = {c: sum(float(a[i]) for i in members[c]) for c in clusters}
    out = {}

    def merged(m):
        m = sorted(m)
        med = m[len(m) // 2]
        mean = torch.stack([feats[i].float() for i in m]).mean(0)
        out[med] = feats[med].float() + mean if merge == "code" else mean

    cp = len(clusters)
    if cp > r2:
        by_s = sorted(clusters, key=lambda c: (s[c], clusters.index(c)))
        for c in by_s[: r2 - 1]:
            merged(members[c])
        merged([i for c in by_s[r2 - 1 :] for i in members[c]])
        return sorted(out), out, None
    q = {}
    for c in clusters:
        x = (len(members[c]) - 1) / (n - cp) * (r2 - cp)
        q[c] = min(round(x), len(members[c]) - 1)  # Python round: half to even
    diff = (r2 - cp) - sum(q.values())
    while diff != 0:
        order = sorted(clusters, key=lambda c: (s[c] if diff > 0 else -s[c], clusters.index(c)))
        for c in order:
            if diff > 0 and q[c] < len(members[c]) - 1:
                q[c] += 1
                diff -= 1
            elif diff < 0 and q[c] > 0:
                q[c] -= 1
                diff += 1
            if diff == 0:
                break
    for c in clusters:
        ranked = sorted(members[c], key=lambda i: (float(a[i]), i))
        for i in ranked[: q[c]]:
            out[i] = feats[i].float()
        merged(ranked[q[c] :])
    return sorted(out), out, q


@pytest.mark.parametrize("merge", ["code", "mean"])
@pytest.mark.parametrize(
    "seed,n,n_labels,r2",
    [(0, 60, 6, 25), (1, 60, 12, 13), (2, 40, 10, 4), (3, 50, 5, 49), (4, 30, 30, 1), (5, 80, 3, 70)],
)
def test_stage2_matches_naive_and_is_exact(merge, seed, n, n_labels, r2):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 8, generator=g)
    a = torch.randint(0, 5, (n,), generator=g).float()  # many ties in a and in S_c
    labels = torch.randint(-1, n_labels - 1, (n,), generator=g)
    plan = stage2_plan(feats, a, labels, r2, merge)
    keep, out, _ = _naive_stage2(feats, a, labels.tolist(), r2, merge)
    assert plan.keep_idx.tolist() == keep and len(keep) == r2  # property 1: exactly R2 tokens
    assert torch.allclose(plan.new_feats, torch.stack([out[i] for i in keep]), atol=1e-6)
    assert plan.new_feats.dtype == feats.dtype and int(plan.weights.sum()) == n


def test_quotas_bounds_and_sum():
    """Property 4: 0 ≤ q_c ≤ n_c − 1 and Σ q_c = R2 − C' (random clusterings, every R2 in [C', n])."""
    g = torch.Generator().manual_seed(11)
    for _ in range(40):
        cp = int(torch.randint(1, 12, (1,), generator=g))
        sizes = torch.randint(1, 30, (cp,), generator=g)
        sums = torch.randint(0, 4, (cp,), generator=g).double()
        n = int(sizes.sum())
        for r2 in range(cp, n + 1):
            q = cluster_quotas(sizes, sums, r2)
            assert (q >= 0).all() and (q <= sizes - 1).all() and int(q.sum()) == r2 - cp


def test_merge_singleton_mean_and_code():
    """Property 5: merge="mean" on a singleton returns the token, merge="code" twice the token."""
    feats = torch.randn(5, 6)
    group = torch.tensor([-1, 0, -1, -1, -1])
    reps, mean, _ = merge_groups(feats, group, 1, "mean")
    assert reps.tolist() == [1] and torch.equal(mean[0], feats[1])
    _, code, _ = merge_groups(feats, group, 1, "code")
    assert torch.equal(code[0], 2 * feats[1])
    reps, _, sizes = merge_groups(feats, torch.tensor([0, 1, 0, 0, 1]), 2, "mean")
    assert reps.tolist() == [2, 4] and sizes.tolist() == [3, 2]  # sorted(M)[|M|//2]


def test_stage2_uses_stage1_labels_from_memo_and_falls_back_to_vic():
    m = build_method("vitcop", {"d_c": "auto"})
    img = _grid_image(seed=2)
    n1, c, r2, _ = vitcop_plan(576, 128, 32, 2, 22)
    keep = m.select(0, img, n1).keep_idx
    orig, labels = img.memo["vitcop"]
    assert torch.equal(orig, keep) and int((labels >= 0).sum()) >= c and labels.max() == c - 1
    pos = img.coords.float() / 24
    want = vic_labels(img.signals["vision_keys"][keep], pos[keep], img.crop[keep], c, "auto", 0.6)
    assert torch.equal(labels, want)
    g = torch.Generator().manual_seed(0)
    hidden, a = torch.randn(n1, 16, generator=g), torch.rand(n1, generator=g)
    view = ImageTokens(hidden, img.coords[keep], img.crop[keep], img.grids, keep, {"key_norms": a}, 0, img.memo)
    plan = m.select(1, view, r2)
    ref = stage2_plan(hidden, a, labels, r2, "code")
    assert torch.equal(plan.keep_idx, ref.keep_idx) and torch.equal(plan.new_feats, ref.new_feats)
    # Stage I kept everything (the engine skips its select): Stage II clusters from vision_keys itself
    full = ImageTokens(
        img.features,
        img.coords,
        img.crop,
        img.grids,
        torch.arange(576),
        {"key_norms": torch.rand(576, generator=g), "vision_keys": img.signals["vision_keys"]},
        0,
        {},
    )
    plan = m.select(1, full, 300)
    labels = vic_labels(img.signals["vision_keys"], pos, img.crop, cluster_count(576, 576), "auto", 0.6)
    assert torch.equal(plan.keep_idx, stage2_plan(img.features, full.signals["key_norms"], labels, 300).keep_idx)


# ------------------------------------------------------------------------------------------ Stage III (6)


def test_stage3_keeps_smallest_norms_stable():
    a = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.5, 2.0, 1.0])
    img = ImageTokens(
        torch.randn(7, 4),
        torch.zeros(7, 2, dtype=torch.long),
        torch.zeros(7, dtype=torch.long),
        [(1, 7)],
        torch.arange(7),
        {"key_norms": a},
    )
    plan = build_method("vitcop", {}).select(2, img, 3)
    assert plan.keep_idx.tolist() == [1, 3, 4] and plan.new_feats is None  # ties at 1.0 -> lower indices


# ---------------------------------------------------------------------------------- key norms and RoPE (2)


def test_key_norm_invariant_under_rope_and_mrope():
    from transformers import LlamaConfig, Qwen2_5_VLConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 4, 50, 16, generator=g)  # (B, H_kv, L, d_h)
    llama = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16))
    pos = torch.randint(0, 4000, (2, 50), generator=g)
    cos, sin = llama(k, pos)
    rotated, _ = apply_rotary_pos_emb(k, k, cos, sin)
    assert torch.allclose(sig.key_norms(rotated), sig.key_norms(k), atol=1e-4)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        )
    )
    qwen = Qwen2_5_VLRotaryEmbedding(cfg.text_config)
    cos, sin = qwen(k, torch.randint(0, 500, (3, 2, 50), generator=g))
    rotated, _ = apply_rotary_pos_emb(k, k, cos, sin)
    assert not torch.allclose(rotated, k)
    assert torch.allclose(sig.key_norms(rotated), sig.key_norms(k), atol=1e-4)


# ------------------------------------------------------------------------------------- engine end-to-end


def _oracles(fam, budget, options, **kw):
    return check_oracles(fam, "vitcop", budget, options, selection_only=False, **kw)


CASES = [
    ("llava", 0.3, {}),
    ("llava_next", 0.3, {}),
    ("qwen2_5_vl", 0.3, {"d_c": "auto"}),
    ("llava", 0.3, {"merge": "mean", "positions": "reindex"}),
    ("qwen2_5_vl", 0.5, {"d_c": "auto", "merge": "mean", "positions": "reindex"}),  # Stage II prunes nothing on 12
]


@pytest.mark.parametrize("fam,budget,options", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_shared_oracles(fam, budget, options):
    record = _oracles(fam, budget, options)
    method = build_method("vitcop", {k: v for k, v in options.items() if k != "positions"})
    for sample in record.samples:  # property 1 end to end: counts entering each layer = the schedule
        n1, r2, r3 = method.schedule(
            sample.n_visual, max(1, math.floor(budget * sample.n_visual + 0.5)), "layer_avg", 6
        )
        assert sample.visual_per_layer == [n1, n1, r2, r2, r3, r3]
        assert [len(e.keep_idx) for e in sample.events] == [n1, r2, r3]
        assert [e.stage for e in sample.events] == ["vision", "llm:2", "llm:4"]


@pytest.mark.parametrize("fam", ["llava", "llava_next", "qwen2_5_vl"])
def test_shared_oracles_eager(fam):
    _oracles(fam, 0.3, {"d_c": "auto"} if fam == "qwen2_5_vl" else {}, attn="eager", bypass=False, alone=False)


def test_stage1_keeps_everything_path_end_to_end():
    """n̄ = 416 of 576 on 6 layers: v is raised to 1, Stage I keeps all, Stage II clusters itself."""
    record = _oracles("llava", 416, {}, bypass=False, alone=False)
    assert record.samples[0].visual_per_layer == [576, 576, 560, 560, 112, 112]


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_positions_are_original_ids_of_representatives(fam):
    """Property 7 under `keep`: in every group the visual rows carry the unpruned id of their representative
    (the row of the kept / merged token's representative index) and ids are non-decreasing (LLaVA)."""
    f = family(fam)
    model, inputs = f.models["sdpa"], f.batches[2]
    vtprune.apply(model, "vitcop", 0.3, **({"d_c": "auto"} if fam == "qwen2_5_vl" else {}))
    try:
        session = vtprune.session_of(model)
        with torch.no_grad():
            out = model(**inputs)
        fw = session.state_for(hf.output_cache(out))
        record = vtprune.last_run(model)
        full = session.adapter.original_positions(inputs["input_ids"], inputs["attention_mask"], dict(inputs))
    finally:
        vtprune.remove(model)
    image_id = model.config.image_token_id
    assert [g.start for g in fw.groups] == [0, 2, 4]
    for gi, group in enumerate(fw.groups):
        for b in range(2):
            valid = group.mask2d[b].bool()
            src = group.seq_index[b][valid]
            assert (src[1:] > src[:-1]).all()  # order of the unpruned sequence is kept
            got = group.positions[..., b, :][..., valid]
            assert torch.equal(got, full[..., b, src])
            if full.dim() == 2:
                assert (got[1:] >= got[:-1]).all()
            vis = (group.vis_image[b] >= 0) & valid
            rows = (inputs["input_ids"][b] == image_id).nonzero().flatten()
            assert torch.equal(group.seq_index[b][vis], rows[group.vis_index[b][vis]])
            assert torch.equal(group.vis_index[b][vis].sort().values, record.samples[b].events[gi].keep_idx)


def test_density_cutoff_per_model_by_capability():
    """d_c=None: 8 on CLIP-tower models (LLaVA families), the 2 % quantile rule on Qwen2.5-VL."""
    for name, want in (("llava", 8.0), ("llava_next", 8.0), ("qwen2_5_vl", "auto")):
        model = family(name).models["sdpa"]
        with vtprune.pruned(model, "vitcop", 0.3):
            assert vtprune.session_of(model).method.d_c == want
        with vtprune.pruned(model, "vitcop", 0.3, d_c=3.0):
            assert vtprune.session_of(model).method.d_c == 3.0


# ------------------------------------------------------------------------- preset="reference" positions (§1/§6)

REFERENCE = "reindex,keep,reindex"  # Stage I contiguous, Stage II kept (post-Stage-I) ids, Stage III contiguous


def test_reference_preset_needs_its_per_stage_position_policy():
    assert build_method("vitcop", {"preset": "reference"}).required_positions() == REFERENCE
    assert build_method("vitcop", {"stage3_positions": "code"}).required_positions() == "keep,keep,reindex"
    assert build_method("vitcop", {}).required_positions() is None
    model = family("llava").models["sdpa"]
    for options, needle in (
        ({"preset": "reference"}, "positions='reindex,keep,reindex'"),
        ({"preset": "reference", "positions": "reindex"}, "positions='reindex,keep,reindex'"),
        ({"stage3_positions": "code"}, "positions='keep,keep,reindex'"),
        ({"positions": "keep,reindex"}, "one rule per stage"),
        ({"positions": "keep,shift,keep"}, "positions must be one of"),
    ):
        with pytest.raises(VtpruneError, match=needle):
            vtprune.apply(model, "vitcop", 0.3, **options)
        assert vtprune.session_of(model) is None


def _run_groups(model, inputs, positions, options, plans=None):
    """Prefill (cached) under `positions` with `plans` replayed (recorded when None), then a 2-token generate.

    -> (prefill groups [(ids, seq_index, mask2d, next_pos, cos)], ids of the first decode step per group, plans,
    session)."""
    from families import recorded_plans, replayed_plans

    vtprune.apply(model, "vitcop", 0.3, positions=positions, **options)
    try:
        session = vtprune.session_of(model)
        with torch.no_grad():
            if plans is None:
                with recorded_plans(model) as plans:
                    out = model(**inputs)
            else:
                with replayed_plans(model, plans):
                    out = model(**inputs)
            fw = session.state_for(hf.output_cache(out))
            groups = [
                (
                    g.positions.clone(),
                    g.seq_index.clone(),
                    g.mask2d.bool(),
                    g.next_pos.clone(),
                    g.pos_emb[None][0].clone() if g.in_llm else None,
                )
                for g in fw.groups
            ]
            with replayed_plans(model, plans):
                gen = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
            steps = [g.step_positions.clone() for g in session.state_for(gen.past_key_values).groups]
        rope = [session.adapter.rotary(torch.zeros(1), ids)[0] for ids, *_ in groups]
    finally:
        vtprune.remove(model)
    return groups, steps, plans, rope


def test_reference_positions_differ_from_default_exactly_where_the_spec_says():
    """Same keep/merge plans (the default run's, replayed): under `keep` every group carries the unpruned ids and
    decodes at the unpruned length + t; under the reference preset group 0 (layers 0..L_s−1) is numbered 0, 1, …
    over the post-Stage-I sequence, group 1 (L_s..L_d−1) carries each row's post-Stage-I id (gaps where Stage II
    dropped rows), group 2 (L_d..) is numbered 0, 1, … again, and every layer decodes at the post-Stage-I length.
    Each in-LLM group's RoPE table is the one of those ids."""
    f = family("llava")
    model, inputs = f.models["sdpa"], f.batches[2]
    default, d_steps, plans, d_rope = _run_groups(model, inputs, "keep", {})
    ref, r_steps, _, r_rope = _run_groups(model, inputs, REFERENCE, {"preset": "reference"}, plans)
    mask = inputs["attention_mask"]
    unpruned = (mask.cumsum(1) - 1).clamp(min=0) * mask
    n_full = mask.sum(1)
    assert len(default) == len(ref) == 3
    for b in range(2):
        (_, seq0, valid0, _, _), (_, seq1, valid1, _, _), (_, seq2, valid2, _, _) = ref
        len1 = int(valid0[b].sum())
        rank1 = torch.searchsorted(seq0[b][valid0[b]], seq1[b][valid1[b]])  # post-Stage-I id of each group-1 row
        want = [torch.arange(len1), rank1, torch.arange(int(valid2[b].sum()))]
        for gi, ((d_ids, d_seq, d_valid, d_next, _), (r_ids, r_seq, r_valid, r_next, _)) in enumerate(
            zip(default, ref, strict=True)
        ):
            assert torch.equal(d_seq, r_seq) and torch.equal(d_valid, r_valid)  # same rows, only the ids differ
            src = d_seq[b][d_valid[b]]
            assert torch.equal(d_ids[b][d_valid[b]], unpruned[b, src])  # keep: original ids everywhere
            assert torch.equal(r_ids[b][r_valid[b]], want[gi]), f"group {gi}"
            assert int(d_next[b]) == int(n_full[b]) and int(r_next[b]) == len1
            assert int(d_steps[gi][b, 0]) == int(n_full[b]) and int(r_steps[gi][b, 0]) == len1
            # where the ids differ: groups 0 and 2 from the first row after a dropped one (contiguous ids);
            # group 1 exactly at rows preceded by a row Stage I dropped (Stage II's own drops leave gaps)
            prompt_rows = mask[b].bool().nonzero().flatten()
            if gi == 1:
                dropped = prompt_rows[~torch.isin(prompt_rows, seq0[b][valid0[b]])]
            else:
                dropped = prompt_rows[~torch.isin(prompt_rows, src)]
            moved = torch.searchsorted(dropped, src) > 0
            differs = d_ids[b][d_valid[b]] != r_ids[b][r_valid[b]]
            assert bool(moved.any()) and torch.equal(differs, moved), f"group {gi}"
    for (_, _, valid, _, cos), table in zip(ref + default, r_rope + d_rope, strict=True):
        if cos is not None:
            assert torch.allclose(cos[valid], table.expand_as(cos)[valid], atol=1e-6)


@pytest.mark.parametrize(
    "fam,options,positions",
    [
        ("llava", {"preset": "reference"}, REFERENCE),
        ("llava_next", {"preset": "reference"}, REFERENCE),
        ("qwen2_5_vl", {"preset": "reference"}, REFERENCE),
        ("llava", {"stage3_positions": "code"}, "keep,keep,reindex"),  # the Stage-III rule alone
    ],
)
def test_reference_cached_decode_equals_uncached_replay(fam, options, positions):
    """Spec §11.5 under the reference preset: cached decoding (every layer at post-Stage-I length + t) equals an
    uncached forward over prompt + generated ids with the same plans, where the generated rows keep those ids at
    Stage III (`session.generated_rows_from`); renumbering them with the prompt (without it) gives other logits."""
    from families import STEPS, TOL, _extend, _input_rows, recorded_plans, replayed_plans
    from oracles import generate_logits

    f = family(fam)
    model, inputs = f.models["sdpa"], f.batches[2]
    vtprune.apply(model, "vitcop", 0.3, positions=positions, **options)
    try:
        session = vtprune.session_of(model)
        with recorded_plans(model) as plans:
            tokens, step_logits = generate_logits(model, inputs, STEPS)
        assert vtprune.last_run(model).positions == positions
        assert len(plans) == 3 * 2  # every stage pruned both images
        prompt = inputs["input_ids"].shape[1]
        replay = _extend(inputs, tokens[:, :-1])
        rows = range(prompt - 1, prompt - 1 + STEPS)
        with session.generated_rows_from(prompt - 1), replayed_plans(model, plans), torch.no_grad():
            full = model(**replay, use_cache=False).logits
        full = _input_rows(full, vtprune.last_run(model).sequence_index, rows)
        assert (full - step_logits).abs().max() <= TOL, "cached decode != uncached replay"
        with replayed_plans(model, plans), torch.no_grad():
            renumbered = model(**replay, use_cache=False).logits
        renumbered = _input_rows(renumbered, vtprune.last_run(model).sequence_index, rows)
        assert (renumbered[:, 1:] - step_logits[:, 1:]).abs().max() > TOL  # the oracle sees the ids
    finally:
        vtprune.remove(model)
