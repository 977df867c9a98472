"""ViTCoP (AAAI 2026): [CLS] filtering + VIC clustering at the vision side, cluster-quota merge at a
shallow LLM layer, key-norm top-k at a deep LLM layer (spec vitcop.md).

Stages `vision`, `llm:L_s`, `llm:L_d` (L_s = 2; L_d = 22 on 32 layers, 19 on 28; other depths
`max(L_s + 1, round(22·L/32))`, so 4 on the 6-layer test models; options `l_s`, `l_d` override).

- Stage I (`vision`, signals `cls_attention`, `vision_keys`): keep the n1 patches with the highest [CLS]
  attention (stable ties). The engine's `cls_attention` is the head *mean*; the spec's head sum ranks
  identically. Per CLIP view with that view's own [CLS] (LLaVA-NeXT): n1 is split over the base view and
  every CLIP tile of the tile area by README §8 (largest remainder on valid counts, ≥ 1 each); the views
  are the engine's `image.tile` (inferred from the grids when absent, see `crop_geometry`).
- VIC (density peaks, fp32) on the kept tokens' `vision_keys` (n1, C), run separately per crop (base view;
  tile area as a whole) with positions `(row/h, col/w)` on the crop grid and, for the tile area,
  image-wide over the padded tile grid: `((tile_row·s + r)/(s·n_rows), (tile_col·s + c)/(s·n_cols))`,
  s×s = the base grid, n_rows × n_cols the anyres tile grid (read from `image.tile`). The C centres are
  split over the crops by largest remainder on their kept counts (our decision; one crop: all C). Labels:
  centres of crop g get global ids, unreached tokens of crop g form the extra cluster `−1 − g`. Stored in
  `image.memo` with the kept original indices; Stage II looks them up by `image.original_index`.
- Stage II (`llm:L_s`, `key_norms`): `a_i = ‖mean_h K_h,i‖` of layer L_s − 1; per-cluster quotas (round
  half to even, exact integer arithmetic), diff walk over clusters by S_c (repeat passes), keep the q_c
  smallest-a members, merge the rest of each cluster at representative `sorted(M)[|M|//2]`:
  `merge="code"` h_med + mean(M) (reference, default) or `"mean"`. C' > R2: R2 − 1 smallest-S clusters one
  token each, the rest one token. Exactly R2 tokens either way. Ties in S_c go to the lower label.
- Stage III (`llm:L_d`, `key_norms`): keep the R3 smallest a (stable ties), no merging.

Budget (layer-averaged B = ρ·N, `schedule`): `v = 0.2 + 0.9ρ`, `n1 = int(v·N)`, `C = max(1, int(pct·n1))`,
`R2 = round((L·ρ/v − L_s)/((L_d − L_s) + (L − L_d)·r3_ratio)·n1)`, `R3 = round(r3_ratio·R2)` (round half up),
all in exact rational arithmetic; reproduces 288/253/51, 230/165/33, 172/77/15 (n̄ 192.06/127.81/63.56)
at N = 576, L = 32. Feasibility: 1 ≤ R3 ≤ R2 ≤ n1, R2 ≥ C + 1, n1 ≥ 1; otherwise v is lowered in steps of
0.05 (spec) and, when R2 > n1 (budgets near N), raised in steps of 0.05 up to 1; `BudgetError` names the
smallest (or largest) feasible budget. A budget above the largest feasible n̄ (about 0.75·N at L = 32,
where n1 = R2 = N) is refused rather than silently under-spent. `budget_mode="retained"` is refused: the
spec defines ViTCoP budgets as layer averages only, and a retained K = n1 leaves R2 undetermined.

Deviations (see the report):
- `pct = 0.09 + 0.27ρ` is applied in the equivalent form `pct = 0.03 + 0.3·v` with the realised
  `v = n1/N`: `select` sees (N, n1) but never ρ. Identical C on the three reference rows (51/34/20);
  elsewhere C can differ by at most 1 from the ρ form, and in the v-lowering fallback pct follows v.
- `d_c`: a number (8 for CLIP ViT-L/14 keys, LLaVA/LLaVA-NeXT) or `"auto"` = the 2 % quantile (linear
  interpolation) of the off-diagonal pairwise key distances of each VIC run (the spec's Qwen2.5-VL rule).
  Default None = the spec's choice per model, by capability: 8 where the model has a CLIP tower (it
  provides `vision_features`), "auto" otherwise (Qwen2.5-VL).
- When Stage I keeps everything (n1 = N, v = 1 at large budgets) the engine skips Stage I's `select`;
  Stage II then runs VIC itself on `vision_keys`, which is why stage 1 also asks for that signal.

Positions (spec §1/§6): `required_positions()` names the engine policy a configuration needs.
- Default (`stage3_positions="orig"`, any policy): with `positions="keep"` every kept or merged token has its
  (representative's) original id at every stage, decoding at unpruned length + t in every layer.
- `preset="reference"` (= `merge="code"` + `stage3_positions="code"`) needs `positions="reindex,keep,reindex"`
  (one rule per stage): contiguous ids after Stage I (the shortened image block), the representatives'
  post-Stage-I ids with gaps in layers L_s..L_d − 1, ids overwritten by the current sequence index from L_d on,
  and decoding at post-Stage-I length + t in every layer (the engine's per-stage rule decodes from layer 0's
  next id) — the reference column exactly.
- `stage3_positions="code"` with `preset="default"` needs `positions="keep,keep,reindex"`: only the Stage-III
  bug on top of original ids (decoding at unpruned length + t).
`positions="reindex"` alone stays available (contiguous at every stage, each layer decoding from its own
length). The reference's fp16 VIC is not reproduced (fp32 always).

Cost: one [CLS] row per crop and the keys of one ViT layer (engine signals); VIC O(n1²·C) for the
distances (≈ 85 MFLOP at n1 = 288, C = 1024) + O(n1²) density/δ + a few vectorised label sweeps;
Stage II O(n1·D) merges; Stage III one top-k. No LLM attention weights (key norms only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from ..budget import largest_remainder_split
from ..errors import BudgetError, VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option, stable_topk

#: Spec constants for LLaVA-1.5-7B (32 layers): L_s = 2, L_d = 22.
L_S, L_D, L_REF = 2, 22, 32
_MEMO = "vitcop"


@dataclass
class ViTCoPConfig(MethodConfig):
    #: Stage-I keep ratio n1 = int(v·N); None = rule `0.2 + 0.9ρ` (reproduces 0.5 / 0.4 / 0.3).
    v: float | None = option(None, gt=0.0, le=1.0)
    #: Cluster-centre ratio C = max(1, int(pct·n1)); None = rule `0.03 + 0.3·n1/N` (= 0.09 + 0.27ρ, see docstring).
    pct: float | None = option(None, gt=0.0, le=1.0)
    #: Density cut-off of VIC: a distance (8: CLIP ViT-L/14 keys), "auto" (2 % quantile per VIC run, Qwen2.5-VL)
    #: or None (8 on CLIP-tower models, "auto" otherwise).
    d_c: float | str | None = option(None, gt=0.0, choices=("auto",))
    #: Spatial constraint of VIC in normalised grid units.
    tau: float = option(0.6, gt=0.0)
    #: Stage-II merged token: "code" (h_med + mean, reference) or "mean".
    merge: str = option("code", choices=("code", "mean"))
    #: R3 = round(r3_ratio·R2).
    r3_ratio: float = option(0.2, gt=0.0, le=1.0)
    #: Shallow / deep layers; None = 2 and max(L_s + 1, round(22·L/32)) (22 on 32 layers, 19 on 28).
    l_s: int | None = option(None, ge=1)
    l_d: int | None = option(None, ge=1)
    #: Stage-III position rule: "orig" (gathered original ids, any engine policy) or "code" (reference bug:
    #: contiguous ids; needs positions="keep,keep,reindex", or "reindex,keep,reindex" under preset="reference").
    stage3_positions: str = option("orig", choices=("orig", "code"))


def deep_layer(num_layers: int, l_s: int = L_S) -> int:
    """Default L_d for a decoder of `num_layers`: max(L_s + 1, round(22·L/32)) (22 on 32, 19 on 28, 4 on 6)."""
    return max(l_s + 1, math.floor(Fraction(L_D * num_layers, L_REF) + Fraction(1, 2)))


def _frac(x: float | int) -> Fraction:
    return Fraction(repr(x)) if isinstance(x, float) else Fraction(x)


def _round(x: Fraction) -> int:
    """Round half up (README §4)."""
    return math.floor(x + Fraction(1, 2))


def default_pct(n: int, n1: int) -> Fraction:
    """`pct = 0.03 + 0.3·v`, v = n1/N: the spec's `0.09 + 0.27ρ` written in v = 0.2 + 0.9ρ."""
    return Fraction(3, 100) + Fraction(3, 10) * Fraction(n1, n)


def cluster_count(n: int, n1: int, pct: float | None = None) -> int:
    """C = max(1, int(pct·n1)) for N = n candidates and n1 kept at Stage I."""
    p = default_pct(n, n1) if pct is None else _frac(pct)
    return max(1, math.floor(p * n1))


def vitcop_plan(
    n: int,
    budget: int,
    num_layers: int,
    l_s: int,
    l_d: int,
    r3_ratio: float = 0.2,
    v: float | None = None,
    pct: float | None = None,
) -> tuple[int, int, int, int] | None:
    """(n1, C, R2, R3) for a layer-averaged budget of `budget` tokens of N = n, or None if infeasible.

    v starts at the given value or `0.2 + 0.9ρ` (capped at 1); while infeasible it is lowered in steps of
    0.05 (R2 < C + 1, R3 < 1: spec) down to 0.05, or raised in steps of 0.05, the last step capped at 1
    (R2 > n1).
    """
    rho = Fraction(budget, n)
    r = _frac(r3_ratio)
    den = (l_d - l_s) + (num_layers - l_d) * r
    v0 = min(_frac(v) if v is not None else Fraction(1, 5) + Fraction(9, 10) * rho, Fraction(1))
    step = Fraction(1, 20)

    def at(vv: Fraction):
        n1 = min(n, math.floor(vv * n))
        if n1 < 1:
            return None, "low"
        c = cluster_count(n, n1, pct)
        r2 = _round((num_layers * rho / vv - l_s) / den * n1)
        r3 = _round(r * r2)
        if r2 > n1:
            return None, "high"
        if r2 < c + 1 or r3 < 1:
            return None, "low"
        return (n1, c, r2, r3), "ok"

    plan, why = at(v0)
    if plan is not None:
        return plan
    k = 1
    while True:
        vv = v0 - k * step if why == "low" else min(v0 + k * step, Fraction(1))
        if vv < step or (why == "high" and v0 + (k - 1) * step >= 1):
            return None
        plan, why_k = at(vv)
        if plan is not None:
            return plan
        if why_k != why:  # lowering v overshot R2 past n1 (or raising it starved R2): no solution
            return None
        k += 1


def realised_layer_avg(n1: int, r2: int, r3: int, num_layers: int, l_s: int, l_d: int) -> float:
    """n̄ = (L_s·n1 + (L_d − L_s)·R2 + (L − L_d)·R3)/L (README §4 input convention)."""
    return (l_s * n1 + (l_d - l_s) * r2 + (num_layers - l_d) * r3) / num_layers


# --------------------------------------------------------------------------------------- Stage I / VIC


def padded_tile_grid(rc: torch.Tensor, a: torch.Tensor, h: int, s_r: int) -> tuple[int, int]:
    """(n_rows, n_cols) of the padded anyres tile grid behind an unpadded tile area.

    rc (m, 2) unpadded (row, col) of the area's candidates, a (m,) their 0-based row-major tile index, h the
    area's row count, s_r the tile height. `unpad_image` cuts one dimension, symmetrically; the top-left
    visible tile is (k_r, k_c) with k_r or k_c = 0, and k full tiles are cut on each side of that dimension.
    """
    r0, c0 = rc[:, 0] == rc[:, 0].min(), rc[:, 1] == rc[:, 1].min()
    first_row = a[r0][torch.argsort(rc[r0, 1])]
    first_col = a[c0][torch.argsort(rc[c0, 0])]
    v_c = len(torch.unique_consecutive(first_row))
    row_tiles = torch.unique_consecutive(first_col).tolist()
    v_r, first = len(row_tiles), int(row_tiles[0])
    if v_r >= 2:
        n_cols = row_tiles[1] - row_tiles[0]
        k_r = first // n_cols
    elif first == 0:
        n_cols, k_r = v_c, 0
    elif h < s_r:  # one visible tile row of a row-cut grid
        n_cols, k_r = v_c, first // v_c
    else:  # one full tile row, columns cut
        n_cols, k_r = v_c + 2 * first, 0
    return v_r + 2 * k_r, n_cols


def crop_geometry(
    coords: torch.Tensor, crop: torch.Tensor, grids, tile: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision view of every candidate and its VIC position.

    coords (n, 2), crop (n,), tile (n,) or None -> (view (n,) int64, pos (n, 2) fp32).
    Crop 0 is one view with positions (row/h, col/w). A crop c ≥ 1 of grid (h, w) is the unpadded area of an
    n_rows × n_cols grid of tiles of the base grid size (s_r, s_c) = grids[0]: one view per tile, positions
    over the padded tile grid (spec: `(full_row/(s_r·n_rows), full_col/(s_c·n_cols))`, full = unpadded +
    padding). With the engine's `tile` (0 = base, 1 + row-major tile index; one tile area) the views are
    `tile` and the tile grid is read from it (`padded_tile_grid`); without it n_rows = ⌈h/s_r⌉, n_cols =
    ⌈w/s_c⌉ (wrong when unpadding cut a whole tile's width or more).
    """
    device = coords.device
    unit = torch.zeros(coords.shape[0], dtype=torch.long, device=device)
    pos = torch.zeros(coords.shape[0], 2, dtype=torch.float32, device=device)
    s_r, s_c = grids[0]
    use_tile = tile is not None and len(grids) == 2
    next_unit = 0
    for c, (h, w) in enumerate(grids):
        m = crop == c
        if not bool(m.any()):
            next_unit += 1 if c == 0 else 0
            continue
        rc = coords[m]
        if c == 0:
            unit[m] = next_unit
            pos[m] = rc.float() / torch.tensor([h, w], dtype=torch.float32, device=device)
            next_unit += 1
            continue
        if use_tile:
            n_rows, n_cols = padded_tile_grid(rc, tile[m] - 1, h, s_r)
        else:
            n_rows, n_cols = -(-h // s_r), -(-w // s_c)
        pad = torch.tensor([(s_r * n_rows - h) // 2, (s_c * n_cols - w) // 2], device=device)
        full = rc + pad
        unit[m] = next_unit + (full[:, 0] // s_r) * n_cols + full[:, 1] // s_c
        pos[m] = full.float() / torch.tensor([s_r * n_rows, s_c * n_cols], dtype=torch.float32, device=device)
        next_unit += n_rows * n_cols
    if tile is not None:
        unit = tile.to(device)
    return unit, pos


def grouped_topk(scores: torch.Tensor, group: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Sorted indices of the quota[g] highest scores of every group g (stable ties).  (n,), (n,), (G,) -> (Σq,)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]  # by group, then score desc, then index
    g = group[order]
    start = torch.searchsorted(g, g, right=False)
    rank = torch.arange(len(order), device=scores.device) - start
    return order[rank < quota[g]].sort().values


def stage1_keep(scores: torch.Tensor, unit: torch.Tensor, n1: int) -> torch.Tensor:
    """Stage I: top-n1 by [CLS] attention, n1 split over CLIP crops by largest remainder.  -> (n1,) sorted."""
    ids, unit = torch.unique(unit, return_inverse=True)
    sizes = torch.bincount(unit, minlength=len(ids)).tolist()
    quota = torch.tensor(largest_remainder_split(n1, sizes), device=scores.device)
    return grouped_topk(scores, unit, quota)


def auto_cutoff(dist: torch.Tensor, q: float = 0.02) -> float:
    """q-quantile (linear interpolation) of the off-diagonal entries of a distance matrix (n, n)."""
    n = dist.shape[0]
    if n < 2:
        return 1.0
    off = dist[~torch.eye(n, dtype=torch.bool, device=dist.device)]
    p = q * (off.numel() - 1)
    lo, hi = math.floor(p), math.ceil(p)
    vals = torch.sort(off).values
    return float(vals[lo] + (vals[hi] - vals[lo]) * (p - lo))


def key_distances(keys: torch.Tensor) -> torch.Tensor:
    """D[i,j] = sqrt(‖X_i − X_j‖² + 1e-8), D[i,i] = 0, fp32, exactly symmetric.  (n, C) -> (n, n)."""
    x = keys.float()
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    d2 = torch.triu(d2, 1)
    d2 = d2 + d2.T
    d = torch.sqrt(d2 + 1e-8)
    return d.fill_diagonal_(0.0)


def vic(keys: torch.Tensor, pos: torch.Tensor, n_centres: int, d_c: float | str = 8.0, tau: float = 0.6):
    """VIC density-peaks clustering of one crop (spec pseudo-code, fp32).

    keys (n, C), pos (n, 2) -> dict of labels (n,) int64 (centres 0..C−1, unreached −1), rho (n,),
    delta (n,) (inf: no valid neighbour), nn (n,) int64 (−1 when undefined), centres (C,).
    """
    n = keys.shape[0]
    device = keys.device
    dist = key_distances(keys)
    cut = auto_cutoff(dist) if d_c == "auto" else float(d_c)
    rho = torch.exp(-((dist / cut) ** 2)).sum(1)
    dp = torch.sqrt(((pos.float()[:, None] - pos.float()[None]) ** 2).sum(-1) + 1e-8)
    eye = torch.eye(n, dtype=torch.bool, device=device)
    valid = (rho[None, :] >= rho[:, None]) & ~eye & (dp <= tau)
    delta, nn = dist.masked_fill(~valid, math.inf).min(1)  # first minimum: ties to the lower index
    has_nn = valid.any(1)
    nn = torch.where(has_nn, nn, torch.full_like(nn, -1))
    gamma = rho * delta
    centres = torch.sort(-gamma, stable=True).indices[: min(n_centres, n)]
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    labels[centres] = torch.arange(len(centres), device=device)
    safe_nn = nn.clamp_min(0)
    while True:  # parallel sweeps; at most the depth of the nn forest
        upd = (labels < 0) & has_nn & (labels[safe_nn] >= 0)
        if not bool(upd.any()):
            break
        labels = torch.where(upd, labels[safe_nn], labels)
    return {"labels": labels, "rho": rho, "delta": delta, "nn": nn, "centres": centres}


def vic_labels(keys, pos, crop, n_centres: int, d_c: float | str = 8.0, tau: float = 0.6) -> torch.Tensor:
    """VIC per crop (base view; tile area as one run) with C split by largest remainder.

    keys (n, C), pos (n, 2) VIC positions (`crop_geometry`), crop (n,) -> labels (n,) int64. Centres of
    crop g get ids offset by the centres of earlier crops; unreached tokens of crop g get −1 − g.
    """
    labels = torch.empty(keys.shape[0], dtype=torch.long, device=keys.device)
    crops = torch.unique(crop).tolist()
    members = [(crop == c).nonzero().flatten() for c in crops]
    quotas = largest_remainder_split(n_centres, [len(m) for m in members])
    base = 0
    for g, (idx, q) in enumerate(zip(members, quotas, strict=True)):
        lab = vic(keys[idx], pos[idx], q, d_c, tau)["labels"]
        labels[idx] = torch.where(lab >= 0, lab + base, torch.full_like(lab, -1 - g))
        base += q
    return labels


# -------------------------------------------------------------------------------------------- Stage II


def cluster_quotas(sizes: torch.Tensor, sums: torch.Tensor, r2: int) -> torch.Tensor:
    """Per-cluster individual quotas q_c with 0 ≤ q_c ≤ n_c − 1 and Σ q_c = R2 − C' (C' = len(sizes) ≤ R2).

    `q_c = min(round_half_even((n_c − 1)(R2 − C')/(n1 − C')), n_c − 1)`, then the diff walk over clusters
    by S_c (ascending to add, descending to remove, stable), repeated until exact.  (C',), (C',) -> (C',).
    """
    c = len(sizes)
    n1 = int(sizes.sum())
    target = r2 - c
    if n1 == c:
        return torch.zeros_like(sizes)
    num = (sizes - 1) * target
    fl = torch.div(num, n1 - c, rounding_mode="floor")
    rem = num - fl * (n1 - c)
    up = (2 * rem > n1 - c) | ((2 * rem == n1 - c) & (fl % 2 == 1))
    q = torch.minimum(fl + up.long(), sizes - 1)
    diff = target - int(q.sum())
    while diff != 0:
        sign = 1 if diff > 0 else -1
        order = torch.sort(sums, descending=sign < 0, stable=True).indices
        room = (q < sizes - 1) if sign > 0 else (q > 0)
        take = order[room[order]][: abs(diff)]
        q[take] += sign
        diff -= sign * len(take)
    return q


def merge_groups(feats: torch.Tensor, group: torch.Tensor, n_groups: int, merge: str):
    """Merge every group of rows into one token at representative sorted(M)[|M|//2].

    feats (n, D), group (n,) in [0, G) or −1 (not merged) -> (reps (G,), merged (G, D) fp32, sizes (G,)).
    """
    member = (group >= 0).nonzero().flatten()  # ascending index
    g = group[member]
    order = torch.sort(g, stable=True).indices  # by group, index ascending inside
    member, g = member[order], g[order]
    sizes = torch.bincount(g, minlength=n_groups)
    start = torch.cumsum(sizes, 0) - sizes
    reps = member[start + sizes // 2]
    f = feats.float()
    total = torch.zeros(n_groups, f.shape[1], dtype=torch.float32, device=f.device).index_add_(0, g, f[member])
    mean = total / sizes.clamp_min(1)[:, None].float()
    merged = f[reps] + mean if merge == "code" else mean
    return reps, merged, sizes


def stage2_plan(feats: torch.Tensor, a: torch.Tensor, labels: torch.Tensor, r2: int, merge: str = "code") -> KeepPlan:
    """Stage II on one image: exactly R2 tokens (kept individually + one merged token per group).

    feats (n, D), a (n,) key norms, labels (n,) cluster labels -> KeepPlan(keep (R2,), new_feats (R2, D)).
    """
    device = feats.device
    _, cl = torch.unique(labels, return_inverse=True)  # clusters in ascending label order
    c = int(cl.max()) + 1
    onehot = cl[None, :] == torch.arange(c, device=device)[:, None]  # (C', n)
    sums = (onehot.double() * a.double()[None]).sum(1)  # S_c (deterministic reduction)
    sizes = onehot.sum(1)
    if c > r2:
        order = torch.sort(sums, stable=True).indices  # smallest S first, ties to the lower label
        target = torch.full((c,), r2 - 1, dtype=torch.long, device=device)
        target[order[: r2 - 1]] = torch.arange(r2 - 1, device=device)
        group, n_groups = target[cl], r2
        solo = torch.zeros(0, dtype=torch.long, device=device)
    else:
        q = cluster_quotas(sizes, sums, r2)
        solo = grouped_topk(-a.float(), cl, q)  # the q_c smallest a of every cluster
        group = cl.clone()
        group[solo] = -1
        n_groups = c
    reps, merged, counts = merge_groups(feats, group, n_groups, merge)
    keep = torch.cat([solo, reps])
    new = torch.cat([feats[solo].float(), merged])
    weights = torch.cat([torch.ones(len(solo), device=device), counts.float()])
    order = keep.argsort()
    return KeepPlan(keep[order], new[order].to(feats.dtype), weights[order].cpu())


# -------------------------------------------------------------------------------------------- method


@register
class ViTCoP(PruningMethod):
    """[CLS] filtering + VIC at the vision side, cluster-quota merge at `llm:L_s`, key-norm top-k at `llm:L_d`."""

    name = "vitcop"
    config_class = ViTCoPConfig
    merges = True
    presets = ("default", "reference")

    def __init__(self, config: ViTCoPConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.preset == "reference":
            if c.merge != "code":
                raise VtpruneError(f"vitcop preset='reference' uses merge='code', got merge={c.merge!r}")
            self.config = c = replace(c, stage3_positions="code")
        if c.merge not in ("code", "mean"):
            raise VtpruneError(f"vitcop merge must be 'code' or 'mean', got {c.merge!r}")
        if c.stage3_positions not in ("orig", "code"):
            raise VtpruneError(f"vitcop stage3_positions must be 'orig' or 'code', got {c.stage3_positions!r}")
        if not (
            c.d_c is None
            or c.d_c == "auto"
            or (isinstance(c.d_c, (int, float)) and not isinstance(c.d_c, bool) and c.d_c > 0)
        ):
            raise VtpruneError(f"vitcop d_c must be a positive number, 'auto' or None, got {c.d_c!r}")
        #: the cut-off in use (None is resolved by `bind`; 8 before, as on LLaVA)
        self.d_c: float | str = 8.0 if c.d_c is None else c.d_c
        if not c.tau > 0:
            raise VtpruneError(f"vitcop tau must be positive, got {c.tau!r}")
        if not 0.0 < c.r3_ratio <= 1.0:
            raise VtpruneError(f"vitcop r3_ratio must lie in (0, 1], got {c.r3_ratio!r}")
        if c.v is not None and not 0.0 < c.v <= 1.0:
            raise VtpruneError(f"vitcop v must lie in (0, 1], got {c.v!r}")
        if c.pct is not None and not 0.0 < c.pct <= 1.0:
            raise VtpruneError(f"vitcop pct must lie in (0, 1], got {c.pct!r}")
        for name in ("l_s", "l_d"):
            value = getattr(c, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise VtpruneError(f"vitcop {name} must be a positive int or None, got {value!r}")

    def required_positions(self) -> str | None:
        """Per-stage engine position rules (Stage I, II, III) of the reference column (spec §1/§6), or None."""
        if self.config.preset == "reference":
            return "reindex,keep,reindex"
        return "keep,keep,reindex" if self.config.stage3_positions == "code" else None

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        if self.config.d_c is None and self.available_signals is not None:
            self.d_c = 8.0 if "vision_features" in self.available_signals else "auto"

    def layers(self, num_layers: int | None = None) -> tuple[int, int]:
        """(L_s, L_d) for a decoder depth (default: the bound depth, else 32)."""
        depth = num_layers or self.num_layers or L_REF
        l_s = self.config.l_s if self.config.l_s is not None else L_S
        l_d = self.config.l_d if self.config.l_d is not None else deep_layer(depth, l_s)
        return l_s, l_d

    def stages(self) -> tuple[Stage, ...]:
        l_s, l_d = self.layers()
        return Stage("vision"), Stage("llm", l_s), Stage("llm", l_d)

    def validate(self, num_layers: int) -> None:
        l_s, l_d = self.layers(num_layers)
        if not 0 < l_s < l_d < num_layers:
            raise VtpruneError(f"vitcop needs 0 < l_s < l_d < {num_layers} (decoder layers), got l_s={l_s}, l_d={l_d}")
        super().validate(num_layers)

    def signals(self, stage_index: int) -> frozenset[str]:
        if stage_index == 0:
            return frozenset({"cls_attention", "vision_keys"})
        if stage_index == 1:  # vision_keys: VIC here when Stage I kept everything (n1 = N, no stage-0 select)
            return frozenset({"key_norms", "vision_keys"})
        return frozenset({"key_norms"})

    def schedule(self, n: int, budget: int, mode: str, num_layers: int) -> list[int]:
        if budget >= n:
            return [n, n, n]
        if mode != "layer_avg":
            raise BudgetError(
                "vitcop budgets are layer-averaged (spec vitcop.md); budget_mode='retained' is not supported"
            )
        c = self.config
        l_s, l_d = self.layers(num_layers)
        plan = vitcop_plan(n, budget, num_layers, l_s, l_d, c.r3_ratio, c.v, c.pct)
        if plan is None:
            ok = lambda b: vitcop_plan(n, b, num_layers, l_s, l_d, c.r3_ratio, c.v, c.pct) is not None  # noqa: E731
            above = next((b for b in range(budget + 1, n) if ok(b)), None)
            below = next((b for b in range(budget - 1, 0, -1) if ok(b)), None)
            where = (
                f"the smallest feasible budget is {above}"
                if above is not None
                else (
                    f"the largest feasible budget below {n} is {below}; a budget >= {n} bypasses the method"
                    if below is not None
                    else "no budget below N is feasible"
                )
            )
            raise BudgetError(
                f"a layer-averaged budget of {budget} is infeasible for vitcop with {n} visual tokens and "
                f"{num_layers} layers (l_s={l_s}, l_d={l_d}): {where}"
            )
        n1, _, r2, r3 = plan
        return [n1, r2, r3]

    # --- select ----------------------------------------------------------------------------------
    def _labels(self, image: ImageTokens, keep: torch.Tensor | None = None) -> torch.Tensor:
        """VIC labels of the candidates `keep` (all when None) of an image holding every Stage-I candidate."""
        c = self.config
        _, pos = crop_geometry(image.coords, image.crop, image.grids, getattr(image, "tile", None))
        keep = torch.arange(image.n, device=pos.device) if keep is None else keep
        n_centres = cluster_count(image.n, len(keep), c.pct)
        keys = image.signals["vision_keys"][keep]
        return vic_labels(keys, pos[keep], image.crop[keep], n_centres, self.d_c, c.tau)

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        c = self.config
        if stage_index == 0:
            unit, _ = crop_geometry(image.coords, image.crop, image.grids, getattr(image, "tile", None))
            keep = stage1_keep(image.signals["cls_attention"], unit, k)
            image.memo[_MEMO] = (image.original_index[keep], self._labels(image, keep))
            return KeepPlan(keep)
        a = image.signals["key_norms"]
        if stage_index == 1:
            if _MEMO in image.memo:
                orig, labels = image.memo[_MEMO]
                at = torch.searchsorted(orig, image.original_index.to(orig.device))
                if bool((at >= len(orig)).any()) or not torch.equal(
                    orig[at.clamp_max(len(orig) - 1)], image.original_index.to(orig.device)
                ):
                    raise VtpruneError("vitcop: Stage-II candidates are not the Stage-I survivors")
                labels = labels[at].to(image.features.device)
            else:  # Stage I kept all N tokens (the engine skipped its select): cluster them now
                labels = self._labels(image)
            return stage2_plan(image.features, a, labels, k, c.merge)
        return KeepPlan(stable_topk(-a.float(), k))
