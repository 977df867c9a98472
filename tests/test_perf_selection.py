"""Faster selection paths (issue 26) pick exactly what the reference formulations pick.

Each test runs the old formulation (kept as the reference function, or restated here in a few lines) next to
the new one on random inputs, including rank-deficient and multi-block shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vtprune.methods.divprune import divprune_order, symmetric_gram
from vtprune.methods.resprune import (
    ResPrune,
    residual_greedy,
    residual_greedy_blocked,
    residual_greedy_gram,
    text_relevance,
)
from vtprune.methods.sparsevlm import dpc_knn, pairwise_distance
from vtprune.methods.vispruner import STEP, vispruner_crop


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- ResPrune
CASES = [  # (n, d, k, rank or None)
    (300, 64, 64, None),  # k = d: the span is exhausted at the last step
    (200, 512, 150, None),  # n < d
    (400, 96, 120, 40),  # rank 40 < k: fill rule after 40 picks
    (257, 33, 257, None),  # k = n > d
    (130, 700, 90, None),
]


@pytest.mark.parametrize("n,d,k,rank", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_resprune_fast_paths_equal_reference(n, d, k, rank, seed):
    g = _gen(seed)
    if rank is None:
        V = torch.randn(n, d, generator=g)
    else:
        V = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    V = V + 3.0 * torch.randn(d, generator=g)  # a shared component, as projector outputs have
    nouns = torch.randn(3, d, generator=g)
    w = text_relevance(V, nouns)
    ref_keep, ref_order = residual_greedy(V, w, k)
    for fast in (residual_greedy_gram, residual_greedy_blocked):
        keep, order = fast(V, w, k)
        assert torch.equal(keep, ref_keep), fast.__name__
        assert torch.equal(order, ref_order), fast.__name__
    for refresh in (0, 7):
        ref = residual_greedy(V, w, k, refresh=refresh)[1]
        assert torch.equal(residual_greedy_gram(V, w, k, refresh=refresh, batch=8, block=5)[1], ref)
        assert torch.equal(residual_greedy_blocked(V, w, k, refresh=refresh, block=5)[1], ref)


def test_resprune_select_uses_a_fast_path_with_the_reference_picks():
    from vtprune.methods.base import ImageTokens

    g = _gen(3)
    V = torch.randn(576, 256, generator=g)
    nouns = torch.randn(2, 256, generator=g)
    r = torch.arange(576)
    image = ImageTokens(
        V,
        torch.stack([r // 24, r % 24], 1),
        torch.zeros(576, dtype=torch.long),
        [(24, 24)],
        r,
        {"noun_embeddings": nouns},
    )
    plan = ResPrune().select(0, image, 128)
    assert torch.equal(plan.keep_idx, residual_greedy(V, text_relevance(V, nouns), 128)[0])


# --------------------------------------------------------------------------------------------- DivPrune
@pytest.mark.parametrize("n,d,block", [(300, 64, 64), (769, 128, 256), (200, 40, 768), (513, 300, 100)])
def test_symmetric_gram_is_the_plain_product(n, d, block):
    v = F.normalize(torch.randn(n, d, generator=_gen(n)), dim=1)
    assert torch.equal(symmetric_gram(v, block), v @ v.T)


def _divprune_reference(feats: torch.Tensor, k: int) -> torch.Tensor:
    """The formulation before issue 26: full `1 − V̂V̂ᵀ`, `kthvalue(2)` for the first pick."""
    v = F.normalize(feats.float(), dim=1)
    dist = 1.0 - v @ v.T
    score = dist.kthvalue(2, dim=0).values
    taken = torch.zeros(len(dist), dtype=torch.bool)
    order = []
    for t in range(k):
        j = score.masked_fill(taken, float("-inf")).argmax()
        order.append(int(j))
        taken[j] = True
        score = dist[j] if t == 0 else torch.minimum(score, dist[j])
    return torch.tensor(order)


@pytest.mark.parametrize("n,d,k", [(576, 64, 192), (1100, 48, 300)])
def test_divprune_order_equals_reference(n, d, k):
    feats = torch.randn(n, d, generator=_gen(k)) + 2.0
    order, _ = divprune_order(feats, k)
    assert torch.equal(order, _divprune_reference(feats, k))


# --------------------------------------------------------------------------------------------- VisPruner
def _vispruner_reference(feats, scores, t, ratio):
    t_imp = int(t * ratio)
    t_div = t - t_imp
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    imp, res = order[:t_imp], order[t_imp:]
    fn = F.normalize(feats.float(), dim=1)
    sim = fn @ fn.T
    while t_div > 0:
        a, b = res[0::2], res[1::2]
        r = min(STEP, len(res) - t_div, len(a))
        if r <= 0:
            break
        dup = sim[a][:, b].max(1).values
        a = a[torch.sort(dup, descending=True, stable=True).indices]
        res = torch.cat([a[r:], b])
    return torch.cat([imp, res[:t_div]]).sort().values


@pytest.mark.parametrize("t", [192, 64, 7])
def test_vispruner_crop_equals_reference(t):
    g = _gen(t)
    feats, scores = torch.randn(576, 64, generator=g), torch.rand(576, generator=g)
    assert torch.equal(vispruner_crop(feats, scores, t, 0.5), _vispruner_reference(feats, scores, t, 0.5))


# --------------------------------------------------------------------------------------------- SparseVLM
def test_pairwise_distance_is_fp64_cdist_rounded():
    g = _gen(5)
    x = torch.randn(300, 512, generator=g) * 0.3 + 20.0 * torch.randn(512, generator=g)  # large shared part
    want = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist").float()
    got = pairwise_distance(x)
    off = ~torch.eye(300, dtype=torch.bool)
    assert torch.equal(got[off], want[off])
    fp32 = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    assert ((got - fp32).abs()[off] / fp32[off]).max() < 1e-5


def _dpc_knn_fp32_cdist(x, c):
    """dpc_knn as it was before issue 26 (direct fp32 cdist)."""
    from vtprune.methods.base import stable_topk

    m, d = x.shape
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)
    dist.fill_diagonal_(0.0)
    knn = dist.topk(c, dim=1, largest=False).values
    rho = (-(knn**2).mean(1)).exp()
    denser = rho[None, :] > rho[:, None]
    delta = torch.where(denser, dist, dist.max()).min(1).values
    centres = stable_topk(rho * delta, c)
    labels = dist[centres].argmin(0)
    labels[centres] = torch.arange(c)
    return centres, labels


@pytest.mark.parametrize("m,c,seed", [(173, 18, 0), (400, 41, 1), (60, 7, 2)])
def test_dpc_knn_equals_fp32_cdist_version(m, c, seed):
    x = torch.randn(m, 256, generator=_gen(seed)) + 4.0
    centres, labels = dpc_knn(x, c)
    want_c, want_l = _dpc_knn_fp32_cdist(x, c)
    assert torch.equal(centres, want_c) and torch.equal(labels, want_l)
