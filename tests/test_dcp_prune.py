"""DCP-Prune (dcp_prune.md): every "Properties a test can check" item, naive references of ACGR / κ / TATCS,
per-crop quotas, τ_κ resolution and calibration, and the shared oracles on the three tiny families."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from factories import image_tokens
from families import check_oracles, family

import vtprune
from vtprune.budget import largest_remainder_split
from vtprune.calibration import dcp as cal
from vtprune.errors import VtpruneError
from vtprune.methods import ImageTokens, build_method, method_class
from vtprune.methods.base import Stage
from vtprune.methods.dcp_prune import (
    DEFAULT_CONTEXT_CAP,
    FALLBACK_TAU,
    DCPPrune,
    DCPPruneConfig,
    acgr,
    dcp_crop,
    kappa,
    load_tau_table,
    tatcs,
    text_relevance,
)

torch.set_num_threads(1)
INF = math.inf


def _image(grids=((24, 24),), d=32, dk=8, seed=0, text=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grids)
    feats = (torch.randn(n, d, generator=g) + 0.5 * torch.randn(1, d, generator=g)).to(dtype)
    signals = {
        "cls_attention": torch.rand(n, generator=g).pow(3).softmax(0),
        "vision_head_keys": torch.randn(n, dk, generator=g),
    }
    if text is not None:
        signals["question_embeddings"] = torch.randn(text, d, generator=g)
    return image_tokens(grids, feats=feats, signals=signals, seed=seed)


def _crop_args(img):
    s = img.signals
    keys = F.normalize(s["vision_head_keys"].float(), dim=1)
    return img.features.float(), s["cls_attention"], keys, img.coords, s.get("question_embeddings")


def _dcp(tau=None, **kw):
    return DCPPrune(DCPPruneConfig(tau_kappa=tau, **kw))


# ------------------------------------------------------------------------------------- naive references


def _naive_acgr(z, s, keys, pos, ka, temperature=0.1, edges=4, recovery="uniform", cap=DEFAULT_CONTEXT_CAP):
    """dcp_prune.md Step 1 with Python loops (float64): anchors, recovered, w, and the (K_a, N) coefficient
    matrix C with recovered = C @ z (row i: the weights of z_i and of its context tokens). recovery "uniform":
    the original rule; "mass": the amended rule written literally (anchor self-mass μ_i, capped weights W')."""
    z, s, keys, pos = z.double(), s.double(), keys.double(), pos.double()
    n = len(z)
    order = sorted(range(n), key=lambda i: (-float(s[i]), i))
    anchors = sorted(order[:ka])
    context = [j for j in range(n) if j not in set(anchors)]
    sigma2 = n / ka
    num = torch.zeros(ka, n, dtype=torch.float64)
    w = torch.ones(ka, dtype=torch.float64)
    for a, i in enumerate(anchors):
        num[a, i] = 1.0 if recovery == "uniform" else float(s[i]) / float(s.mean())
    mean_s = float(s.mean())
    for j in context:
        logits = [
            (float(keys[j] @ keys[i]) / temperature - float(((pos[j] - pos[i]) ** 2).sum()) / (2 * sigma2), a)
            for a, i in enumerate(anchors)
        ]
        top = sorted(logits, key=lambda t: (-t[0], t[1]))[: min(edges, ka)]
        ex = [math.exp(v - top[0][0]) for v, _ in top]
        for (_, a), e in zip(top, ex, strict=True):
            wj = e / sum(ex)
            num[a, j] += wj * float(s[j]) / mean_s
            w[a] += wj
    if recovery == "mass":
        for a, i in enumerate(anchors):
            mu_i = float(num[a, i])
            m_i = float(num[a].sum()) - mu_i
            if m_i > 0 and m_i / (mu_i + m_i) > cap:  # scale the context weights: share exactly λ_ctx
                scale = cap * mu_i / ((1 - cap) * m_i)
                own = num[a, i].clone()
                num[a] *= scale
                num[a, i] = own
    coef = num / num.sum(1, keepdim=True)
    return anchors, coef @ z, w, coef


def _naive_kappa(z_full, z_kept, w, shrinkage=8.0, eps=1e-6):
    zf = F.normalize(z_full.double(), dim=1)
    zk = F.normalize(z_kept.double(), dim=1)
    w = w.double()
    total = 0.0
    k = len(zk)
    for d in range(zf.shape[1]):
        mf = float(zf[:, d].mean())
        vf = float(((zf[:, d] - mf) ** 2).mean())
        mk = float((w * zk[:, d]).sum() / w.sum())
        vk = float((w * (zk[:, d] - mk) ** 2).sum() / w.sum())
        vk = k / (k + shrinkage) * vk + shrinkage / (k + shrinkage) * vf
        vf, vk = vf + eps, vk + eps
        total += 0.5 * (vf / vk + (mk - mf) ** 2 / vk - 1 + math.log(vk / vf))
    return total / zf.shape[1]


def _naive_tatcs(zc, wc, sc, text, k, gamma=0.5, gamma_r=0.5):
    """dcp_prune.md Step 4 items 2-5 with Python loops (float64): sorted pool indices and masses."""
    zn = F.normalize(zc.double(), dim=1)
    m = len(zn)

    def mm(x):
        lo, hi = min(x), max(x)
        return [0.0] * len(x) if hi <= lo else [(v - lo) / (hi - lo) for v in x]

    if text is None or len(text) == 0:
        r = [0.0] * m
    else:
        tn = F.normalize(text.double(), dim=1)
        r = mm([max(float(zn[i] @ tn[t]) for t in range(len(tn))) for i in range(m)])
    sh = mm([float(v) for v in sc])
    centres = [max(range(m), key=lambda i: (sh[i] + r[i], -i))]
    while len(centres) < k:
        rest = [i for i in range(m) if i not in centres]
        centres.append(max(rest, key=lambda i: (min(1 - float(zn[i] @ zn[c]) for c in centres), -i)))
    labels = []
    for i in range(m):
        sims = [float(zn[i] @ zn[c]) - gamma * abs(r[i] - r[c]) for c in centres]
        labels.append(max(range(k), key=lambda u: (sims[u], -u)))
    for u, c in enumerate(centres):
        labels[c] = u
    reps, mass = [], []
    for u in range(k):
        members = [i for i in range(m) if labels[i] == u]
        score = {i: sum(float(zn[i] @ zn[j]) for j in members) / len(members) + gamma_r * r[i] for i in members}
        best = max(score.values())
        reps.append(min(i for i in members if score[i] >= best - 1e-6))  # ties (rounding) to the lower index
        mass.append(sum(float(wc[j]) for j in members))
    order = sorted(range(k), key=lambda u: reps[u])
    return [reps[u] for u in order], [mass[u] for u in order], centres, labels


# ------------------------------------------------------------------------------------------- registration


def test_registered_name_alias_stage_signals_options():
    assert method_class("dcp") is method_class("dcp_prune") is DCPPrune
    m = build_method("dcp", {"edges": 3, "tau_kappa": 0.5})
    assert m.merges and m.stages() == (Stage("vision"),)
    assert m.signals(0) == frozenset({"cls_attention", "vision_head_keys", "question_embeddings"})
    assert DCPPruneConfig.option_names() == [
        "preset",
        "tau_kappa",
        "calibration_key",
        "recovery",
        "context_cap",
        "semantic_temperature",
        "edges",
        "pool_factor",
        "gamma",
        "gamma_r",
        "shrinkage",
        "eps",
    ]
    c = DCPPruneConfig()
    assert (c.recovery, c.context_cap) == ("mass", DEFAULT_CONTEXT_CAP) == ("mass", 0.05)
    assert (
        c.tau_kappa,
        c.calibration_key,
        c.semantic_temperature,
        c.edges,
        c.pool_factor,
        c.gamma,
        c.gamma_r,
        c.shrinkage,
        c.eps,
    ) == (None, None, 0.1, 4, 4, 0.5, 0.5, 8.0, 1e-6)
    for bad in (
        {"tau_kappa": float("nan")},
        {"edges": 0},
        {"pool_factor": 0},
        {"semantic_temperature": 0.0},
        {"eps": 0.0},
        {"shrinkage": -1.0},
        {"preset": "reference"},
        {"recovery": "sum"},
        {"context_cap": 1.5},
        {"context_cap": -0.1},
    ):
        with pytest.raises(VtpruneError):
            build_method("dcp_prune", bad)


def test_tau_resolution_explicit_shipped_fallback():
    table = load_tau_table()
    shipped = table["builtin:shapes-llava"]["tau_kappa"]
    assert math.isfinite(shipped) and shipped > 0 and table["builtin:shapes-llava"]["n_images"] == 256
    assert _dcp().tau == FALLBACK_TAU == 0.3
    assert _dcp(calibration_key="builtin:shapes-llava").tau == shipped
    assert _dcp(0.7, calibration_key="builtin:shapes-llava").tau == 0.7
    assert _dcp(INF).tau == INF
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constructing never warns: `apply` does (test_dcp_amended.py)
        assert _dcp(calibration_key="no/such-model").tau == FALLBACK_TAU


# -------------------------------------------------------------------------------------------- property 1


@pytest.mark.parametrize("tau", [0.0, INF, None])
@pytest.mark.parametrize(
    "grids,k",
    [
        (((24, 24),), 1),
        (((24, 24),), 16),
        (((24, 24),), 64),
        (((6, 8),), 47),
        (((4, 4), (6, 8)), 19),
        (((4, 4), (8, 4)), 2),
    ],
)
def test_exactly_k_unique_sorted_outputs(tau, grids, k):
    """Property 1 for every trigger outcome (κ_A ≤ τ, TATCS, guard)."""
    img = _image(grids, seed=k)
    m = _dcp(tau)
    plan = m.select(0, img, k)
    idx = plan.keep_idx
    assert idx.dtype == torch.long and len(idx) == k and torch.equal(idx, idx.unique())
    assert 0 <= int(idx[0]) and int(idx[-1]) < img.n
    assert plan.new_feats.shape == (k, img.features.shape[1]) and plan.new_feats.dtype == img.features.dtype
    assert abs(float(plan.weights.sum()) - img.n) < 1e-3  # masses: every token represented once
    (decisions,) = list(m.decisions)
    assert [d.k for d in decisions] == [q for q in largest_remainder_split(k, [h * w for h, w in grids]) if q]


def test_all_three_branches_reached_and_guard_returns_acgr():
    seen = set()
    for seed in range(6):
        img = _image(((6, 8),), seed=seed)
        for k in (1, 2, 5, 12):
            m = _dcp(0.0)
            plan = m.select(0, img, k)
            d = m.decisions[-1][0]
            seen.add(d.branch)
            z, s, keys, pos, _ = _crop_args(img)
            anchors, rec, _ = acgr(z, s, keys, pos, k)
            if d.branch == "guard":
                assert d.kappa_t >= d.kappa_a
                assert torch.equal(plan.keep_idx, anchors) and torch.equal(plan.new_feats, rec)
            else:
                assert d.branch == "tatcs" and d.kappa_t < d.kappa_a
    assert seen == {"tatcs", "guard"}
    m = _dcp(INF)
    m.select(0, _image(), 64)
    assert m.decisions[-1][0].branch == "acgr" and m.decisions[-1][0].kappa_t is None


def test_bf16_features_fp32_math():
    img = _image(dtype=torch.bfloat16)
    plan = _dcp(0.0).select(0, img, 32)
    assert plan.new_feats.dtype == torch.bfloat16
    img32 = ImageTokens(img.features.float(), img.coords, img.crop, img.grids, img.original_index, img.signals)
    plan32 = _dcp(0.0).select(0, img32, 32)
    assert torch.equal(plan.keep_idx, plan32.keep_idx)
    assert torch.equal(plan.new_feats, plan32.new_feats.to(torch.bfloat16))


# ----------------------------------------------------------------------------------------- properties 2, 3


@pytest.mark.parametrize("recovery", ["uniform", "mass"])
@pytest.mark.parametrize("seed,ka,edges", [(0, 5, 4), (1, 16, 4), (2, 3, 4), (3, 1, 4), (4, 20, 2), (5, 47, 4)])
def test_acgr_matches_naive_and_is_convex(seed, ka, edges, recovery):
    img = _image(((6, 8),), seed=seed)
    z, s, keys, pos, _ = _crop_args(img)
    anchors, rec, w = acgr(z, s, keys, pos, ka, 0.1, edges, recovery)
    n_anchors, n_rec, n_w, coef = _naive_acgr(z, s, keys, pos, ka, 0.1, edges, recovery)
    assert anchors.tolist() == n_anchors
    assert (rec.double() - n_rec).abs().max() < 1e-5 and (w.double() - n_w).abs().max() < 1e-5
    assert abs(float(w.sum()) - img.n) < 1e-4  # property 2: Σ w = N_c
    # property 3: convex combination of the anchor's own feature and its context features
    assert (coef >= 0).all() and torch.allclose(coef.sum(1), torch.ones(ka, dtype=torch.float64))
    others = torch.ones_like(coef, dtype=torch.bool)
    others[torch.arange(ka), torch.tensor(n_anchors)] = False
    is_anchor = torch.zeros(img.n, dtype=torch.bool)
    is_anchor[anchors] = True
    assert (coef[:, is_anchor] * others[:, is_anchor]).abs().max() == 0  # no anchor mixes in another anchor
    lonely = w == 1
    assert torch.equal(rec[lonely], z[anchors][lonely])  # anchor with no incoming edge: unchanged


@pytest.mark.parametrize("recovery", ["uniform", "mass"])
def test_acgr_some_anchor_without_edges_unchanged(recovery):
    img = _image(((24, 24),), seed=3)
    z, s, keys, pos, _ = _crop_args(img)
    anchors, rec, w = acgr(z, s, keys, pos, 300, 0.1, 1, recovery)
    lonely = w == 1
    assert lonely.any() and torch.equal(rec[lonely], z[anchors][lonely])
    assert not torch.equal(rec[~lonely], z[anchors][~lonely])


def test_acgr_full_budget_is_identity():
    img = _image(((6, 8),))
    z, s, keys, pos, _ = _crop_args(img)
    anchors, rec, w = acgr(z, s, keys, pos, img.n)
    assert torch.equal(anchors, torch.arange(img.n)) and torch.equal(rec, z) and torch.equal(w, torch.ones(img.n))
    for k in (1, 7, 47):
        assert abs(float(acgr(z, s, keys, pos, k)[2].sum()) - img.n) < 1e-4


# -------------------------------------------------------------------------------------------- property 4


def test_kappa_nonnegative_zero_on_full_set_and_matches_naive():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(60, 12, generator=g) + 0.3
    assert float(kappa(z, z, torch.ones(60))) < 1e-6
    assert float(kappa(z, z, torch.ones(60))) >= 0
    for k in (1, 3, 10, 59):
        for _ in range(3):
            idx = torch.randperm(60, generator=g)[:k]
            w = torch.rand(k, generator=g) * 5
            kap = float(kappa(z, z[idx] * 2.0, w))  # scale-free: rows are normalised
            assert kap >= 0 and abs(kap - _naive_kappa(z, z[idx], w)) < 1e-5 * max(1.0, kap)
    other = float(kappa(z, z[:5], torch.ones(5), 3.0, 1e-3))  # shrinkage / eps are honoured
    assert abs(other - _naive_kappa(z, z[:5], torch.ones(5), 3.0, 1e-3)) < 1e-6


# -------------------------------------------------------------------------------------------- property 5


@pytest.mark.parametrize("seed,k,text", [(0, 16, 3), (1, 5, 1), (2, 1, 3), (3, 30, None), (4, 12, 0)])
def test_tatcs_matches_naive_clusters_valid(seed, k, text):
    img = _image(((6, 8),), seed=seed, text=text)
    z, s, keys, pos, t = _crop_args(img)
    pool, zc, wc = acgr(z, s, keys, pos, min(img.n, 4 * k))
    reps, mass, cent, labels = tatcs(zc, wc, s[pool], t, k)
    n_reps, n_mass, n_cent, n_labels = _naive_tatcs(zc, wc, s[pool], t, k)
    assert cent.tolist() == n_cent and labels.tolist() == n_labels
    assert reps.tolist() == n_reps and torch.allclose(mass.double(), torch.tensor(n_mass, dtype=torch.float64))
    # property 5: clusters non-empty, centres in their own cluster, output ⊂ pool, one rep per cluster
    assert torch.equal(labels.bincount(minlength=k) > 0, torch.ones(k, dtype=torch.bool))
    assert torch.equal(labels[cent], torch.arange(k))
    assert len(reps) == k == len(reps.unique()) and int(reps.max()) < len(pool)
    assert sorted(labels[reps].tolist()) == list(range(k))
    assert abs(float(mass.sum()) - float(wc.sum())) < 1e-4


def test_text_relevance_minmax_and_empty():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 6, generator=g)
    r = text_relevance(z, torch.randn(2, 6, generator=g))
    assert float(r.min()) == 0.0 and abs(float(r.max()) - 1.0) < 1e-6
    for empty in (None, torch.zeros(0, 6), torch.zeros(1, 6)):  # no question / constant relevance
        assert torch.equal(text_relevance(z, empty), torch.zeros(10))


# -------------------------------------------------------------------------------------------- property 6


def test_empty_question_does_not_depend_on_text():
    img = _image(((6, 8),), seed=2, text=None)
    ref = _dcp(0.0).select(0, img, 6)
    for text in (torch.zeros(0, 32), torch.zeros(2, 32)):  # empty question; constant relevance (r ≡ 0)
        other = ImageTokens(
            img.features,
            img.coords,
            img.crop,
            img.grids,
            img.original_index,
            {**img.signals, "question_embeddings": text},
        )
        plan = _dcp(0.0).select(0, other, 6)
        assert torch.equal(plan.keep_idx, ref.keep_idx) and torch.equal(plan.new_feats, ref.new_feats)
    # with a real question the text can matter (sanity: the TATCS branch reads it)
    changed = 0
    for seed in range(5):
        a, b = _image(((6, 8),), seed=seed, text=2), _image(((6, 8),), seed=seed, text=None)
        changed += not torch.equal(_dcp(0.0).select(0, a, 6).keep_idx, _dcp(0.0).select(0, b, 6).keep_idx)
    assert changed > 0


@pytest.mark.parametrize("grids,k", [(((24, 24),), 64), (((24, 24),), 16), (((4, 4), (6, 8)), 19)])
def test_infinite_tau_equals_acgr(grids, k):
    img = _image(grids, seed=k)
    plan = _dcp(INF).select(0, img, k)
    z, s, keys, pos, _ = _crop_args(img)
    quotas = largest_remainder_split(k, [h * w for h, w in grids])
    keep, feats = [], []
    for c, q in enumerate(quotas):
        idx = (img.crop == c).nonzero().flatten()
        anchors, rec, _ = acgr(z[idx], s[idx], keys[idx], pos[idx], q)
        keep.append(idx[anchors])
        feats.append(rec)
    assert torch.equal(plan.keep_idx, torch.cat(keep)) and torch.equal(plan.new_feats, torch.cat(feats))


# -------------------------------------------------------------------------------------------- property 7


@pytest.mark.parametrize("tau", [0.0, INF, None])
def test_deterministic_and_permutation_invariant(tau):
    img = _image(((24, 24),), seed=5)
    a, b = _dcp(tau).select(0, img, 32), _dcp(tau).select(0, img, 32)
    assert torch.equal(a.keep_idx, b.keep_idx) and torch.equal(a.new_feats, b.new_feats)
    perm = torch.randperm(img.n, generator=torch.Generator().manual_seed(1))
    permuted = ImageTokens(
        img.features[perm],
        img.coords[perm],
        img.crop[perm],
        img.grids,
        img.original_index,
        {k: (v[perm] if k != "question_embeddings" else v) for k, v in img.signals.items()},
    )
    c = _dcp(tau).select(0, permuted, 32)
    got = perm[c.keep_idx]
    order = got.argsort()
    assert torch.equal(got[order], a.keep_idx)
    assert (c.new_feats[order] - a.new_feats).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------- per-crop quotas


def test_per_crop_quotas_and_independent_triggers():
    """README §8: the image's K is split over crops by largest remainder; each crop is run on its own."""
    grids = ((4, 4), (6, 8))
    img = _image(grids, seed=7)
    m = _dcp(0.05)
    plan = m.select(0, img, 13)
    quotas = largest_remainder_split(13, [16, 48])
    z, s, keys, pos, t = _crop_args(img)
    keep, feats = [], []
    for c, q in enumerate(quotas):
        idx = (img.crop == c).nonzero().flatten()
        kp, fp, _, info = dcp_crop(z[idx], s[idx], keys[idx], pos[idx], t, q, 0.05, m.config)
        assert (m.decisions[-1][c].branch, m.decisions[-1][c].kappa_a) == (info["branch"], info["kappa_a"])
        keep.append(idx[kp])
        feats.append(fp)
    assert [int((img.crop[plan.keep_idx] == c).sum()) for c in range(2)] == quotas == [3, 10]
    assert torch.equal(plan.keep_idx, torch.cat(keep)) and torch.equal(plan.new_feats, torch.cat(feats))
    # a crop is unaffected by the other crop's content
    other = img.features.clone()
    other[:16] = torch.randn(16, 32)
    img2 = ImageTokens(other, img.coords, img.crop, img.grids, img.original_index, img.signals)
    plan2 = _dcp(0.05).select(0, img2, 13)
    assert torch.equal(plan2.keep_idx[3:], plan.keep_idx[3:]) and torch.equal(plan2.new_feats[3:], plan.new_feats[3:])


# ------------------------------------------------------------------------------------------ engine oracles


@pytest.mark.parametrize("name,budget", [("llava", 64), ("llava", 16), ("llava_next", 0.3), ("qwen2_5_vl", 0.3)])
@pytest.mark.parametrize("tau", [None, 0.0, 1e9])
def test_oracles_on_three_families(name, budget, tau):
    """Bypass, cached decode == uncached replay, batch independence (merging method: selection_only=False);
    τ = 0 forces TATCS, τ = 1e9 is pure ACGR."""
    method = _dcp(tau)
    record = check_oracles(name, method, budget, {}, selection_only=False)
    n_img = [s.n_visual for s in record.samples]
    want = [max(1, math.floor(budget * n + 0.5)) if isinstance(budget, float) else budget for n in n_img]
    assert [s.retained_tokens for s in record.samples] == want
    branches = {d.branch for image in method.decisions for d in image}
    if tau == 1e9:
        assert branches <= {"acgr", "all"}
    if tau == 0.0:  # TATCS evaluated on every crop; its output wins somewhere (on tiny Qwen the guard does)
        assert branches <= {"tatcs", "guard"} and ("tatcs" in branches or name == "qwen2_5_vl")


def test_next_per_crop_decisions_in_engine():
    """LLaVA-NeXT: one decision per vision view (base view, then each CLIP tile's unpadded positions), with
    quotas split by largest remainder over the views' valid counts."""
    fam = family("llava_next")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    method = _dcp(0.0)
    with vtprune.pruned(model, method, 0.3), torch.no_grad():
        model(**inputs)
        adapter = vtprune.session_of(model).adapter
        views = [torch.bincount(adapter.image_tiles(i)).tolist() for i in range(2)]
    images = list(method.decisions)
    assert len(images) == 2
    for image, sizes, (n_base, n_tiles) in zip(images, views, [(16, 48), (16, 32)], strict=True):
        sizes = [n for n in sizes if n]
        assert sizes[0] == n_base and sum(sizes[1:]) == n_tiles and len(sizes) > 2
        k = math.floor(0.3 * (n_base + n_tiles) + 0.5)
        assert [(d.crop, d.n, d.k) for d in image] == list(
            zip(range(len(sizes)), sizes, largest_remainder_split(k, sizes), strict=True)
        )


# ---------------------------------------------------------------------------------------------- calibration


def test_kappa_values_measure_acgr_at_reference_budget():
    """calibration: κ_A at K = round(ρ·N) through the engine == κ(ACGR(K)) on the signals the method saw."""
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    values = cal.kappa_values(model, [inputs], 1 / 9)
    seen = []
    probe = _dcp(INF)
    stock = probe.select

    def spy(stage, image, k):
        seen.append((image, k))
        return stock(stage, image, k)

    probe.select = spy
    with vtprune.pruned(model, probe, 1 / 9, budget_mode="retained"), torch.no_grad():
        model(**inputs)
    assert len(values) == 2 and [k for _, k in seen] == [64, 64]
    for v, (image, k) in zip(values, seen, strict=True):
        z, s, keys, pos, _ = _crop_args(image)
        anchors, rec, w = acgr(z, s, keys, pos, k)
        assert abs(v - float(kappa(z, rec, w))) < 1e-6
    assert cal.calibrate_tau_kappa(model, [inputs], 1 / 9, 100) == pytest.approx(max(values))
    assert cal.calibrate_tau_kappa(model, [inputs], 1 / 9, 0) == pytest.approx(min(values))
    assert vtprune.session_of(model) is None


def test_calibrate_folder_on_builtin_images(tmp_path):
    from vtprune.testbed import load_builtin, make_scene, render

    model, processor = load_builtin("shapes-llava")
    assert cal.model_key(model) == "builtin:shapes-llava"
    for i in range(3):
        render(make_scene(7, i)).save(tmp_path / f"{i:012d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in cal.folder_images(tmp_path, 2)] == ["000000000000.png", "000000000001.png"]
    prompt = cal.chat_prompt(processor)
    assert prompt == "USER: <image>\nDescribe this image briefly. ASSISTANT:"
    tau = cal.calibrate_folder(model, processor, tmp_path, n_images=2, percentile=100, batch_size=1)
    batches = cal.image_batches(processor, cal.folder_images(tmp_path, 2), prompt, batch_size=2)
    values = cal.kappa_values(model, batches, 1 / 9)
    assert len(values) == 2 and tau == pytest.approx(max(values), abs=1e-6)


def test_write_read_tau_round_trip(tmp_path):
    path = tmp_path / "tau.json"
    assert cal.read_tau("m", path) is None
    cal.write_tau("m", 0.25, path, n_images=3)
    cal.write_tau("a", 0.5, path)
    assert cal.read_tau("m", path) == 0.25 and cal.read_tau("a", path) == 0.5
    assert load_tau_table(path)["m"] == {"tau_kappa": 0.25, "n_images": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dcp(calibration_key="builtin:shapes-llava").tau == cal.read_tau("builtin:shapes-llava")


@pytest.mark.slow
def test_shipped_builtin_tau_reproduces():
    """The shipped value = 90th percentile of κ_A over 256 eval-stream scenes at ρ = 1/9 (≈ 35 s)."""
    assert cal.calibrate_builtin_v2() == pytest.approx(cal.read_tau("builtin:shapes-llava"), rel=1e-5)


def test_calibrate_cli_writes_the_value(tmp_path, capsys):
    """`vtprune calibrate-dcp --images DIR --write FILE` prints and stores the same τ_κ as the function."""
    from vtprune.cli import main
    from vtprune.testbed import load_builtin, make_scene, render

    for i in range(2):
        render(make_scene(7, i)).save(tmp_path / f"{i:012d}.png")
    table = tmp_path / "tau.json"
    assert main(["calibrate-dcp", "--images", str(tmp_path), "--n", "2", "--batch", "1", "--write", str(table)]) == 0
    assert "builtin:shapes-llava" in capsys.readouterr().out
    model, processor = load_builtin("shapes-llava")
    want = cal.calibrate_folder(model, processor, tmp_path, n_images=2, batch_size=1)
    assert cal.read_tau("builtin:shapes-llava", table) == pytest.approx(want, abs=1e-6)
