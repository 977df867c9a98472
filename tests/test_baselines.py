"""uniform, downsample, divprune, vispruner: spec properties ("Properties a test can check" of baselines.md,
divprune.md, vispruner.md), naive reference implementations, and the engine oracles (O1 bypass, O2/O3 masking
reference, batch independence, budget accounting) on the tiny LLaVA. VisionZip: tests/test_visionzip.py (its
inserted [CLS] token has no row in the masking reference; the bypass / batch / budget test runs here)."""

from __future__ import annotations

import math

import pytest
import torch
from factories import image_tokens
from oracles import generate_logits, masked_reference_logits
from test_engine_oracles import _pool_replacements

import vtprune
from vtprune.errors import VtpruneError
from vtprune.methods import build_method, stable_topk
from vtprune.methods.divprune import divprune_order
from vtprune.methods.pool import Pool2D
from vtprune.methods.uniform import uniform_lattice
from vtprune.methods.vispruner import vispruner_crop


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
        keep = method.select(0, image_tokens(seed=1), g * g).keep_idx
        assert torch.equal(keep, method.select(0, image_tokens(seed=2), g * g).keep_idx)  # content-free
        rows, cols = sorted(set((keep // 24).tolist())), sorted(set((keep % 24).tolist()))
        assert len(rows) == len(cols) == g
        assert len({b - a for a, b in zip(rows, rows[1:], strict=False)}) == 1 and rows == cols


def test_uniform_per_crop_quotas_multi_grid():
    img = image_tokens(grids=((24, 24), (24, 24), (12, 24)))
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
    img = image_tokens()
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
    plan = build_method("divprune", {}).select(0, image_tokens(((5, 8),), feats=feats), 15)
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
    _check_plan(build_method("divprune", {}).select(0, image_tokens(feats=feats), 64), 64, 576)


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
# tests/test_visionzip.py (spec properties, the [CLS] insertion, naive references from the hooked CLIP layer)


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
    img = image_tokens(signals=_vision_signals(576))
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
    multi = image_tokens(grids=((24, 24), (12, 24)), signals=_vision_signals(864))
    keep = build_method("vispruner", {}).select(0, multi, 96).keep_idx
    assert int((keep < 576).sum()) == 64 and int((keep >= 576).sum()) == 32
    with pytest.raises(VtpruneError):
        build_method("vispruner", {"important_ratio": 1.5})


# --------------------------------------------------------------------------------------- through the engine

ENGINE = [
    ("uniform", {}),
    ("downsample", {}),
    ("divprune", {}),
    ("vispruner", {}),
]
STEPS = 3


def _replacements(model, inputs, record, method, options):
    """Merged features recomputed from stock features (merging reference; downsample = pooling)."""
    assert method == "downsample"
    return _pool_replacements(model, inputs, record)


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


@pytest.mark.parametrize("method,options", ENGINE + [("visionzip", {})])
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
