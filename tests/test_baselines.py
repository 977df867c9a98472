"""uniform, downsample, divprune, visionzip, vispruner: spec properties ("Properties a test can check" of
baselines.md, divprune.md, visionzip.md, vispruner.md), naive reference implementations, and the engine
oracles (O1 bypass, O2/O3 masking reference, batch independence, budget accounting) on the tiny LLaVA."""

from __future__ import annotations

import math

import pytest
import torch
from families import grid_layout
from oracles import generate_logits, masked_reference_logits
from test_engine_oracles import _pool_replacements

import vtprune
from vtprune.errors import VtpruneError
from vtprune.methods import ImageTokens, build_method, stable_topk
from vtprune.methods.divprune import divprune_order
from vtprune.methods.pool import Pool2D
from vtprune.methods.uniform import uniform_lattice
from vtprune.methods.visionzip import split_budget, visionzip_crop
from vtprune.methods.vispruner import vispruner_crop


def _image(n=576, grids=((24, 24),), d=16, seed=0, signals=None, feats=None):
    g = torch.Generator().manual_seed(seed)
    coords, crop, n = grid_layout(grids)
    return ImageTokens(
        feats if feats is not None else torch.randn(n, d, generator=g),
        coords,
        crop,
        list(grids),
        torch.arange(n),
        signals or {},
        seed,
    )


def _vision_signals(n, c=32, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    return {"cls_attention": torch.rand(n, generator=g).softmax(0), "vision_keys": torch.randn(n, c, generator=g)}


def _check_plan(plan, k, n):
    idx = plan.keep_idx
    assert idx.dtype == torch.long and len(idx) == k
    assert torch.equal(idx, idx.unique()) and 0 <= int(idx[0]) and int(idx[-1]) < n


# ---------------------------------------------------------------------------------------------- uniform


def _naive_lattice(h, w, k):
    """baselines.md pseudo-code, line by line, in plain Python."""
    g_h = min(max(math.floor(math.sqrt(k * h / w) + 0.5), 1), h)
    g_w = min(max(math.ceil(k / g_h), 1), w)
    if g_h * g_w < k:
        g_h = min(max(math.ceil(k / g_w), 1), h)
    rows = [math.floor((a + 0.5) * h / g_h) for a in range(g_h)]
    cols = [math.floor((b + 0.5) * w / g_w) for b in range(g_w)]
    points = [(r, c) for r in rows for c in cols]
    m = len(points)
    drop = {math.floor((j + 0.5) * m / (m - k)) for j in range(m - k)} if m > k else set()
    return sorted(r * w + c for i, (r, c) in enumerate(points) if i not in drop)


def test_uniform_spec_examples_on_24x24():
    keep64 = uniform_lattice(24, 24, 64).tolist()
    assert keep64 == [r * 24 + c for r in range(1, 24, 3) for c in range(1, 24, 3)]
    lattice14 = [r * 24 + c for r in [math.floor((a + 0.5) * 24 / 14) for a in range(14)]
                 for c in [math.floor((b + 0.5) * 24 / 14) for b in range(14)]]
    want = sorted(p for i, p in enumerate(lattice14) if i not in (24, 73, 122, 171))
    assert uniform_lattice(24, 24, 192).tolist() == want
    rows11 = [math.floor((a + 0.5) * 24 / 11) for a in range(11)]
    cols12 = [math.floor((b + 0.5) * 2) for b in range(12)]
    lattice = [r * 24 + c for r in rows11 for c in cols12]
    want = sorted(p for i, p in enumerate(lattice) if i not in (16, 49, 82, 115))
    assert uniform_lattice(24, 24, 128).tolist() == want


@pytest.mark.parametrize("h,w", [(24, 24), (7, 13), (24, 10), (1, 9), (5, 1)])
def test_uniform_matches_naive_and_is_exact(h, w):
    for k in range(1, h * w):
        got = uniform_lattice(h, w, k).tolist()
        assert got == _naive_lattice(h, w, k) and len(set(got)) == k


def test_uniform_square_lattice_evenly_spaced_and_deterministic():
    method = build_method("uniform", {})
    for g in (4, 6, 8, 12):
        keep = method.select(0, _image(seed=1), g * g).keep_idx
        assert torch.equal(keep, method.select(0, _image(seed=2), g * g).keep_idx)  # content-free
        rows, cols = sorted(set((keep // 24).tolist())), sorted(set((keep % 24).tolist()))
        assert len(rows) == len(cols) == g
        assert len({b - a for a, b in zip(rows, rows[1:], strict=False)}) == 1 and rows == cols


def test_uniform_per_crop_quotas_multi_grid():
    img = _image(grids=((24, 24), (24, 24), (12, 24)))
    keep = build_method("uniform", {}).select(0, img, 160).keep_idx
    _check_plan(build_method("uniform", {}).select(0, img, 160), 160, img.n)
    counts = [int(((keep >= a) & (keep < b)).sum()) for a, b in ((0, 576), (576, 1152), (1152, 1440))]
    assert counts == [64, 64, 32]
    assert keep[:64].tolist() == uniform_lattice(24, 24, 64).tolist()
    assert (keep[128:] - 1152).tolist() == uniform_lattice(12, 24, 32).tolist()


# ------------------------------------------------------------------------------------------- downsample


def test_downsample_is_pool_on_llava():
    method = build_method("downsample", {"mode": "avg"})
    assert isinstance(method, Pool2D) and method.merges and not method.exact_count
    img = _image()
    for k in (192, 128, 64):
        a, b = method.select(0, img, k), build_method("pool", {}).select(0, img, k)
        assert torch.equal(a.keep_idx, b.keep_idx) and torch.equal(a.new_feats, b.new_feats)


# --------------------------------------------------------------------------------------------- divprune


def _naive_divprune(feats, k):
    """Greedy max-min on cosine distance with plain Python loops (float64)."""
    v = feats.double().tolist()
    n = len(v)
    norms = [math.sqrt(sum(x * x for x in row)) for row in v]
    dist = [[1.0 - sum(a * b for a, b in zip(v[i], v[j], strict=True)) / (norms[i] * norms[j]) for j in range(n)]
            for i in range(n)]
    nn = [sorted(dist[i][j] for i in range(n))[1] for j in range(n)]
    chosen = [max(range(n), key=lambda j: (nn[j], -j))]
    while len(chosen) < k:
        cand = [j for j in range(n) if j not in chosen]
        chosen.append(max(cand, key=lambda j: (min(dist[s][j] for s in chosen), -j)))
    return chosen


@pytest.mark.parametrize("seed", range(4))
def test_divprune_matches_naive_greedy(seed):
    feats = torch.randn(40, 6, generator=torch.Generator().manual_seed(seed))
    order, _ = divprune_order(feats, 15)
    assert order.tolist() == _naive_divprune(feats, 15)
    plan = build_method("divprune", {}).select(0, _image(40, ((5, 8),), feats=feats), 15)
    assert plan.keep_idx.tolist() == sorted(order.tolist()) and plan.new_feats is None


def test_divprune_first_pick_and_monotone_scores():
    feats = torch.randn(576, 32, generator=torch.Generator().manual_seed(5))
    order, achieved = divprune_order(feats, 64)
    v = torch.nn.functional.normalize(feats.double(), dim=1)
    dist = 1 - v @ v.T
    nn = (dist + torch.eye(576, dtype=torch.double) * 9).min(0).values
    assert int(order[0]) == int(nn.argmax())  # the most isolated token
    # achieved min-distance to the chosen set is non-increasing from the second pick on
    assert (achieved[2:] <= achieved[1:-1] + 1e-6).all()
    _check_plan(build_method("divprune", {}).select(0, _image(feats=feats), 64), 64, 576)


def test_divprune_invariances():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(100, 8, generator=g)
    base = divprune_order(feats, 20)[0]
    scale = torch.rand(100, 1, generator=g) * 10 + 0.1
    assert torch.equal(divprune_order(feats * scale, 20)[0], base)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert torch.equal(divprune_order(feats @ q, 20)[0], base)
    perm = torch.randperm(100, generator=g)
    assert torch.equal(perm[divprune_order(feats[perm], 20)[0]], base)  # permutation equivariance


def test_divprune_never_picks_a_duplicate_while_positive_distance_remains():
    g = torch.Generator().manual_seed(8)
    feats = torch.randn(30, 8, generator=g)
    feats = torch.cat([feats, feats[:10]])  # tokens 30..39 duplicate 0..9
    order, achieved = divprune_order(feats, 30)
    for t in range(30):
        picked = set(order[:t].tolist())
        j = int(order[t])
        twin = j + 30 if j < 10 else j - 30 if j >= 30 else None
        if twin is not None and twin in picked:
            assert achieved[t] <= 1e-6  # only when no unpicked token has a positive min-distance
    assert len(set(order.tolist())) == 30


def test_divprune_ratio_option():
    assert build_method("divprune", {"r": 0.098}).schedule(576, 999, "layer_avg", 32) == [56]
    assert build_method("divprune", {}).schedule(576, 64, "retained", 32) == [64]
    with pytest.raises(VtpruneError):
        build_method("divprune", {"r": 1.5})


# -------------------------------------------------------------------------------------------- visionzip


def test_visionzip_split_rule_reproduces_source_rows():
    assert [split_budget(k) for k in (192, 128, 64, 32)] == [(162, 30), (108, 20), (54, 10), (27, 5)]
    assert split_budget(2) == (1, 1) and split_budget(1) == (1, 0)
    assert split_budget(50, 1, 0) == (50, 0)


def _naive_visionzip(feats, metric, scores, k_dom, k_ctx, merge):
    n = len(scores)
    dom = sorted(range(n), key=lambda i: (-float(scores[i]), i))[:k_dom]
    rest = [i for i in range(n) if i not in dom]
    step = max(1, len(rest) // k_ctx)
    tgt = list(range(0, len(rest), step))[:k_ctx]
    m = [metric[i] / metric[i].norm() for i in range(n)]
    groups = {u: [] for u in range(k_ctx)}
    for p in range(len(rest)):
        if p in tgt:
            continue
        sims = [float(m[rest[p]] @ m[rest[t]]) for t in tgt]
        groups[max(range(k_ctx), key=lambda u: (sims[u], -u))].append(rest[p])
    out = {i: feats[i] for i in dom}
    for u, t in enumerate(tgt):
        members = groups[u]
        if merge == "reference":
            extra = torch.stack([feats[j] for j in members]).mean(0) if members else torch.zeros_like(feats[0])
            out[rest[t]] = feats[rest[t]] + extra
        else:
            out[rest[t]] = torch.stack([feats[rest[t]]] + [feats[j] for j in members]).mean(0)
    return out, dom, [rest[t] for t in tgt]


@pytest.mark.parametrize("merge", ["reference", "mean"])
def test_visionzip_matches_naive_reference(merge):
    g = torch.Generator().manual_seed(3)
    n, k_dom, k_ctx = 64, 20, 6
    feats, metric, scores = torch.randn(n, 12, generator=g), torch.randn(n, 5, generator=g), torch.rand(n, generator=g)
    keep, new, weights = visionzip_crop(feats, metric, scores, k_dom, k_ctx, merge)
    want, dom, tgt = _naive_visionzip(feats, metric, scores, k_dom, k_ctx, merge)
    assert keep.tolist() == sorted(want) and len(keep) == k_dom + k_ctx
    for i, row in zip(keep.tolist(), new, strict=True):
        assert torch.allclose(row, want[i], atol=1e-5)
    assert set(dom) == set(stable_topk(scores, k_dom).tolist())  # dominant = top-K_dom by [CLS] attention
    rest = [i for i in range(n) if i not in dom]
    assert tgt == rest[0 : (n - k_dom) // k_ctx * k_ctx : (n - k_dom) // k_ctx]  # evenly spaced in the rest
    assert float(weights.sum()) == n  # every remaining token merged into exactly one target


def test_visionzip_target_without_members_keeps_its_feature():
    n = 30
    feats = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    scores = torch.zeros(n)
    scores[:10] = 1.0  # dominant = 0..9; rest = 10..29; step = 20 // 2 = 10: targets 10 and 20
    metric = torch.zeros(n, 2)
    metric[:, 0] = 1.0
    metric[20] = torch.tensor([0.0, 1.0])  # orthogonal to everyone: nobody joins target 20
    keep, new, weights = visionzip_crop(feats, metric, scores, 10, 2, "reference")
    assert keep.tolist() == list(range(11)) + [20]
    assert torch.equal(new[-1], feats[20]) and weights[-1] == 1 and weights[10] == 19
    assert torch.allclose(new[10], feats[10] + feats[[i for i in range(11, 30) if i != 20]].mean(0), atol=1e-6)


def test_visionzip_method_counts_crops_and_pure_cls_mode():
    img = _image(signals=_vision_signals(576))
    for k, kd in ((192, 162), (128, 108), (64, 54)):
        plan = build_method("visionzip", {"vision_heads": 4}).select(0, img, k)
        _check_plan(plan, k, 576)
        assert plan.new_feats.shape == (k, 16) and plan.new_feats.dtype == img.features.dtype
        dom = stable_topk(img.signals["cls_attention"], kd)
        assert set(dom.tolist()) <= set(plan.keep_idx.tolist())
        assert int((plan.weights == 1).sum()) >= kd and float(plan.weights.sum()) == 576
    pure = build_method("visionzip", {"contextual": 0, "vision_heads": 4}).select(0, img, 64)
    assert torch.equal(pure.keep_idx, stable_topk(img.signals["cls_attention"], 64))
    assert torch.equal(pure.new_feats, img.features[pure.keep_idx])
    multi = _image(grids=((24, 24),) * 5, signals=_vision_signals(2880))
    plan = build_method("visionzip", {"vision_heads": 4}).select(0, multi, 160)
    _check_plan(plan, 160, 2880)
    assert [int(((plan.keep_idx // 576) == c).sum()) for c in range(5)] == [32] * 5
    for c in range(5):  # each crop: its own 27 dominant tokens
        sl = slice(576 * c, 576 * (c + 1))
        dom = stable_topk(multi.signals["cls_attention"][sl], 27) + 576 * c
        assert set(dom.tolist()) <= set(plan.keep_idx.tolist())
    with pytest.raises(VtpruneError):
        build_method("visionzip", {"merge": "sum"})
    with pytest.raises(VtpruneError):
        build_method("visionzip", {"vision_heads": 5}).select(0, img, 64)


# -------------------------------------------------------------------------------------------- vispruner


def _naive_vispruner(feats, scores, t, ratio):
    """vispruner.md pseudo-code in plain Python lists. The cosine matrix is taken from torch (fp32) so that
    near-equal duplicate scores order the same way (the loop is sensitive to their last bit)."""
    t_imp = int(t * ratio)
    t_div = t - t_imp
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    imp, res = order[:t_imp], order[t_imp:]
    fn = torch.nn.functional.normalize(feats.float(), dim=1)
    sim = (fn @ fn.T).tolist()
    while t_div > 0:
        a, b = res[0::2], res[1::2]
        r = min(8, len(res) - t_div, len(a))
        if r <= 0:
            break
        dup = [max(sim[x][y] for y in b) for x in a]
        a = [x for _, _, x in sorted(((-dup[p], p, x) for p, x in enumerate(a)))]
        res = a[r:] + b
    return sorted(imp + (res if t_div else []))  # |residual| = T_div at the end


@pytest.mark.parametrize(
    "n,t,ratio",
    [(576, 64, 0.5), (300, 128, 0.5), (120, 33, 0.5), (50, 7, 0.75), (40, 3, 0.0), (21, 2, 0.5), (30, 5, 1.0)],
)
def test_vispruner_matches_naive_reference(n, t, ratio):
    g = torch.Generator().manual_seed(n + t)
    feats, scores = torch.randn(n, 10, generator=g), torch.rand(n, generator=g)
    got = vispruner_crop(feats, scores, t, ratio)
    assert got.tolist() == _naive_vispruner(feats, scores, t, ratio) and len(got) == t
    assert set(stable_topk(scores, int(t * ratio)).tolist()) <= set(got.tolist())


def test_vispruner_iterations_remove_only_from_a():
    g = torch.Generator().manual_seed(2)
    feats, scores = torch.randn(576, 10, generator=g), torch.rand(576, generator=g)
    trace = []
    vispruner_crop(feats, scores, 64, 0.5, trace)
    remaining = 576 - 32
    for a, b, removed in trace:
        step = min(8, remaining - 32, len(a))
        assert len(removed) == step and set(removed.tolist()) <= set(a.tolist())
        assert not set(removed.tolist()) & set(b.tolist())
        remaining -= step
    assert remaining == 32


def test_vispruner_special_cases_and_invariances():
    g = torch.Generator().manual_seed(4)
    img = _image(signals=_vision_signals(576))
    scores = img.signals["cls_attention"]
    fast = build_method("vispruner", {"important_ratio": 1.0}).select(0, img, 64).keep_idx
    assert torch.equal(fast, stable_topk(scores, 64))  # r = 1: FasterVLM
    # all-identical features: duplicates removed in the order of the alternate split (deterministic)
    same = torch.ones(40, 4)
    s = torch.linspace(1, 0, 40)  # descending attention = index order
    res, t_div = list(range(2, 40)), 4
    while (r := min(8, len(res) - t_div, len(res[0::2]))) > 0:
        res = res[0::2][r:] + res[1::2]
    assert vispruner_crop(same, s, 6, 0.34).tolist() == sorted([0, 1] + res)
    # positive rescaling of rows; permutation equivariance given the ranking
    base = vispruner_crop(img.features, scores, 64, 0.5)
    assert torch.equal(vispruner_crop(img.features * (torch.rand(576, 1, generator=g) + 0.1), scores, 64, 0.5), base)
    perm = torch.randperm(576, generator=g)
    assert torch.equal(perm[vispruner_crop(img.features[perm], scores[perm], 64, 0.5)].sort().values, base)
    multi = _image(grids=((24, 24), (12, 24)), signals=_vision_signals(864))
    keep = build_method("vispruner", {}).select(0, multi, 96).keep_idx
    assert int((keep < 576).sum()) == 64 and int((keep >= 576).sum()) == 32
    with pytest.raises(VtpruneError):
        build_method("vispruner", {"important_ratio": 1.5})


# --------------------------------------------------------------------------------------- through the engine

ENGINE = [
    ("uniform", {}),
    ("downsample", {}),
    ("divprune", {}),
    ("visionzip", {"vision_heads": 4}),  # tiny CLIP: 4 heads
    ("vispruner", {}),
]
STEPS = 3


def _stock_signals(model, pixels):
    """[CLS] attention (eager CLIP) and k_proj output of the feature layer, computed outside the engine."""
    keys = []
    attn = model.model.vision_tower.encoder.layers[-2].self_attn
    handle = attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o))
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixels, output_attentions=True)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
        handle.remove()
    return out.attentions[-2][:, :, 0, 1:].mean(1), keys[0][:, 1:]


def _replacements(model, inputs, record, method, options):
    """Merged features recomputed from stock features and stock signals (merging reference)."""
    if method == "downsample":
        return _pool_replacements(model, inputs, record)
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    cls, keys = _stock_signals(model, inputs["pixel_values"])
    out = {}
    for b, sample in enumerate(record.samples):
        img = _image(feats=feats[b], signals={"cls_attention": cls[b], "vision_keys": keys[b]})
        plan = build_method(method, options).select(0, img, len(sample.events[0].keep_idx))
        assert torch.equal(plan.keep_idx, sample.events[0].keep_idx)
        rows = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        for f, r in zip(plan.new_feats, plan.keep_idx, strict=True):
            out[(b, int(rows[r]))] = f
    return out


@pytest.mark.parametrize("method,options", ENGINE)
def test_engine_masking_reference_and_cached_decode(models, batches, method, options):
    """O2 + O3 (merging methods: with their merged features as replacements)."""
    model, inputs = models["sdpa"], batches[2]
    with vtprune.pruned(model, method, 64, **options):
        tokens, logits = generate_logits(model, inputs, STEPS)
        record = vtprune.last_run(model)
    replace = _replacements(model, inputs, record, method, options) if build_method(method, options).merges else None
    ref = masked_reference_logits(model, inputs, record, tokens[:, :-1], replace)
    prompt = inputs["input_ids"].shape[1]
    assert (logits - ref[:, prompt - 1 :]).abs().max() <= 1e-4


@pytest.mark.parametrize("method,options", ENGINE)
def test_engine_bypass_batch_independence_and_budgets(models, batches, method, options):
    model, inputs = models["sdpa"], batches[2]
    with torch.no_grad():
        stock = model(**inputs).logits
    with vtprune.pruned(model, method, 576, **options):  # O1: budget >= N is the stock model
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, stock)
        assert vtprune.last_run(model).samples[0].retained_tokens == 576
    expected = {192: 196, 128: 132, 64: 64} if method == "downsample" else {192: 192, 128: 128, 64: 64}
    with vtprune.pruned(model, method, 64, **options):
        tokens, logits = generate_logits(model, inputs, STEPS)
        kept = [s.events[0].keep_idx for s in vtprune.last_run(model).samples]
        for b in range(2):
            pad = int((inputs["attention_mask"][b] == 0).sum())
            alone = {key: inputs[key][b : b + 1, pad:] for key in ("input_ids", "attention_mask")}
            alone["pixel_values"] = inputs["pixel_values"][b : b + 1]
            t1, l1 = generate_logits(model, alone, STEPS)
            assert torch.equal(vtprune.last_run(model).samples[0].events[0].keep_idx, kept[b])
            assert (l1[0] - logits[b]).abs().max() <= 1e-4 and torch.equal(t1[0], tokens[b])
    for budget, want in expected.items():
        with vtprune.pruned(model, method, budget, **options):
            with torch.no_grad():
                model(**inputs)
            rec = vtprune.last_run(model)
        assert [s.retained_tokens for s in rec.samples] == [want, want]
        assert [s.layer_avg_tokens for s in rec.samples] == [want, want]
