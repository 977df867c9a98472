"""SparseVLM (ICML 2025), v1.5: text-rater attention ranks visual tokens at three layers; dropped tokens are
partly recycled into DPC-kNN cluster means (spec sparsevlm.md). `version="2.0"`: SparseVLM+ (below).

Per image:
1. raters (once, at the first stage, kept in `image.memo`): `P = softmax_t(V_e T_eᵀ)` over the layer-0 input
   rows of the image's candidates `V_e` (n, D) and of the question span `T_e` (T_s, D) (`visual_embeddings`,
   `suffix_embeddings`); `m_t = mean_i P[i, t]`, raters `{t : m_t > mean_t m_t}` (all when empty);
2. after decoder layers ℓ ∈ {2, 6, 15} of 32 (stages `llm:3`, `llm:7`, `llm:16`): relevance `rel_j` = mean over
   rater rows of the engine's `suffix_attention` (T_s, n) (layer ℓ, head mean, recomputed rows, no eager
   attention); keep the top-k (`k = min(k_ℓ, n_v − 1)`, stable ties);
3. recycling: of the dropped tokens (rel descending) the first `m = ⌊0.3·n_del⌋ + 1` are clustered into
   `c = ⌊m/10⌋ + 1` groups by DPC-kNN on their layer-ℓ outputs (`image.features`); each cluster becomes its
   mean, placed at the slot of its centre (the representative), so the stage keeps `k + c` tokens:
   `keep_idx = sorted(kept ∪ centres)`, `new_feats` = kept features unchanged + cluster means.

SparseVLM+ (`version="2.0"`, spec "SparseVLM+ (v2.0) option"): same raters, layers and selection, but
- no recycling (selection only, keep ids: the engine's default `positions="keep"`), counts = k_ℓ of the v2.0
  table column (192: 300 / 200 / 118, 128: 238 / 108 / 60, 96: 246 / 54 / 28, 64: 66 / 34 / 20);
- gravity correction: each head's rater→candidate probability `A_h[t, j]` (engine `suffix_attention_heads`
  (H, T_s, n), query heads after the GQA repeat) is divided by the RoPE-only score `W[t, j]` of the two
  positions (engine `suffix_rope_gravity` (T_s, n): `(2/√d_h)·Σ_i cos((p_t − q_j)·θ_i)`, θ_i = base^(−2i/d_h);
  Qwen2.5-VL M-RoPE: pair i uses the t / h / w id of its section, spec "Our decision");
- head selection: of the corrected rater→candidate scores, only the `h = heads_kept(H)` heads with the largest
  total Σ_{t∈raters, j} A_h[t, j]/W[t, j] are kept; `rel_j` = mean over those heads and over the raters.
  Our decision (head count): `h = max(1, min(H, round_half_up(14·H/32)))`, the spec's 14 of 32 heads of
  LLaVA-7B scaled to the head count (12 of 28 on Qwen2.5-VL-7B, 2 of 4 on the tiny test models).
  Our reading (order): heads are ranked by their total *corrected* attention (the spec divides first, "then"
  selects heads).
  Caveat (spec followed literally): W is not positive at every distance — for d_h = 128, base 10⁴ (LLaVA-NeXT-7B)
  W ≤ 0 first at |p − q| = 1707 (and |W| gets as small as 5e-4 below 3000). LLaVA-1.5 prompts (< 700 ids) and
  Qwen2.5-VL-7B (base 10⁶: W > 2 for t/h/w id differences up to 4000) never get there; long NeXT prompts do,
  and there the division flips the sign of (or blows up) a candidate's score. The tiny test models (d_h = 16)
  hit W ≤ 0 from |p − q| = 91.

Schedules (`schedule=`): "reference" (default) uses the authors' v1.5 table rows (192 / 128 / 96 / 64 of 576)
for any `budget_mode`; a budget selects the row whose share of N it is (`|B − N·label/576| < 1.5`), e.g. NeXT
640 of 2880 → row 128, Qwen ρ = 1/3 → row 192; other budgets raise `BudgetError`. "matched" scales the three
k_ℓ of the nearest row by a common factor (bisection, each rounded half up) so that the realised count is the
closest reachable to the budget: the true layer average n̄ (`layer_avg`), or the tokens left after the first
stage (`retained`, FastV's convention for an in-LLM cut). Other depths: pruning layers
`round_half_up(ℓ·L/32)` (bumped to stay strictly increasing; 2, 5, 13 on 28 layers; 0, 1, 3 on 6), counts
`k_ℓ = round_half_up(N·k_ℓ^LLaVA/576)`. `schedule()` returns the visual counts after each stage including the
recycled tokens (k + c). v2.0 uses its own table column the same way (both schedules; the spec's matched mode
is not restricted to v1.5), with counts k_ℓ (no recycling).

Extra compute (no layer is switched to eager; SDPA/FA kernels run unchanged):
- raters, once per image: N·T_s·D MACs and one (N, T_s) softmax;
- per stage (engine `suffix_attention`): the question-span query rows of layer ℓ, T_s·D·H·d_h MACs for the
  queries + T_s·T·H·d_h for the scores (keys from the layer's KV cache, or T·D·H_kv·d_h to recompute them
  without a cache); all T_s question-span rows are computed and the raters are picked from them;
- recycling: an m×m distance matrix O(m²·D) (one fp64 GEMM; m ≤ 173 at N = 576) and O(m·c) assignment, per
  stage.
v2.0 instead, per stage: the same query rows and MACs, but the per-head probabilities (H, T_s, T) are kept
(H times the memory of the head mean: 32·T_s·T fp32 on LLaVA-7B); the gravity W: cos/sin of (T_s + T)·d_h/2
angles and two (T_s × d_h/2)·(d_h/2 × T) products in fp64 (T_s·T·d_h MACs); the correction, head totals and
head mean O(H·|R|·n); no recycling.

Deviations / decisions (see the report):
- option `schedule` is the spec's `budget_mode` ("reference" | "matched"), renamed because `budget_mode` is
  `vtprune.apply`'s own layer_avg/retained switch;
- `recycle=False` turns recycling off in v1.5 (selection only, counts = k_ℓ; not a spec variant); the default
  (None) means "as the version does": True for v1.5, False for v2.0 (`recycle=True` with v2.0 is refused);
- v2.0: head count for other head numbers and the order divide-then-select are ours (see above); W ≤ 0 is
  not guarded (spec followed literally, see the caveat);
- `select` only sees the scheduled total k + c, and two top-k sizes can give the same total
  (`k + c(n−k) = (k+1) + c(n−k−1)`); the method therefore remembers the split its `schedule` chose for each
  (stage, n, total) and falls back to the larger k for a total it did not schedule (hand-built calls);
- matched mode's infeasibility bound is the exact smallest n̄ (all k_ℓ → 1, recycled clusters included,
  e.g. 58 at N = 576), slightly above the spec's 3N/L;
- at least one token is kept by rank (`k ≥ 1`) when the fractional schedule rounds k_ℓ to 0 (tiny N);
- DPC-kNN ties are broken deterministically (lower candidate index) instead of the reference's 1e-6 noise,
  and a cluster is the exact mean of its members (reference: sum / (count + 1e-6));
- `preset="reference"` (v1.5): selection identical; at every stage the kept tokens stay in their current order
  and the recycled ones follow in cluster order (`KeepPlan.order`), with the reference's contiguous ids: it
  needs `positions="reindex"` (refused otherwise). The default orders every visual token by representative
  index with kept ids. v2.0 (and `recycle=False`) has no recycled tokens: its reference keeps ids, which is
  the default `positions="keep"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import BudgetError, VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option, stable_topk

#: Reference v1.5 kept counts k_ℓ after layers 2 / 6 / 15 of LLaVA-1.5-7B, per budget label (Source).
ROWS: dict[int, tuple[int, int, int]] = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
#: SparseVLM+ (v2.0) kept counts k_ℓ after layers 2 / 6 / 15 (no recycling), per budget label (Source).
ROWS_V2: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 118),
    128: (238, 108, 60),
    96: (246, 54, 28),
    64: (66, 34, 20),
}
#: Decoder layers after which LLaVA-1.5-7B (32 layers, 576 tokens) prunes.
PRUNE_AFTER = (2, 6, 15)
REF_LAYERS, REF_N = 32, 576
SCHEDULES = ("reference", "matched")
VERSIONS = ("1.5", "2.0")
#: SparseVLM+ keeps this many of LLaVA-7B's REF_HEADS attention heads (Source); scaled for other head counts.
V2_HEADS, REF_HEADS = 14, 32


@dataclass
class SparseVLMConfig(MethodConfig):
    #: "1.5" (fixed schedules + recycling) or "2.0" (SparseVLM+: gravity-corrected top-head attention, no recycling).
    version: str = option("1.5", choices=VERSIONS)
    #: "reference" (the authors' table rows, any budget_mode) or "matched" (k_ℓ scaled to reach the budget).
    schedule: str = option("reference", choices=SCHEDULES)
    #: Recycle part of the dropped tokens into cluster means. None: as the version does (1.5 yes, 2.0 no).
    recycle: bool | None = option(None)


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def prune_layers(num_layers: int) -> tuple[int, ...]:
    """Decoder layers after which SparseVLM prunes: `round_half_up(ℓ·L/32)`, kept strictly increasing."""
    out: list[int] = []
    for layer in PRUNE_AFTER:
        p = round_half_up(layer * num_layers / REF_LAYERS)
        out.append(max(p, out[-1] + 1) if out else p)
    return tuple(out)


def recycle_sizes(n_del: int) -> tuple[int, int]:
    """(m, c): dropped tokens that are clustered, `m = ⌊0.3·n_del⌋ + 1`, and clusters `c = ⌊m/10⌋ + 1`."""
    if n_del <= 0:
        return 0, 0
    m = (3 * n_del) // 10 + 1
    return m, m // 10 + 1


def stage_count(n: int, k_l: int, recycle: bool = True) -> tuple[int, int]:
    """(k, n_after) of one stage on n current tokens: `k = max(1, min(k_ℓ, n − 1))`, n_after = k + c."""
    if n <= 1:
        return n, n
    k = max(1, min(k_l, n - 1))
    return k, k + (recycle_sizes(n - k)[1] if recycle else 0)


def stage_counts(n: int, ks, recycle: bool = True) -> list[int]:
    """Visual tokens after each stage (recycled tokens included) for kept counts `ks` = (k_1, k_2, k_3)."""
    out, cur = [], n
    for k_l in ks:
        cur = stage_count(cur, k_l, recycle)[1]
        out.append(cur)
    return out


def split_count(n: int, total: int) -> tuple[int, int]:
    """Invert `stage_count`: (k, c) with `k + c(n − k) = total`, the largest such k.  Raises if unreachable."""
    best = None
    for k in range(max(1, total - n), min(total, n - 1) + 1):  # c ≤ n − k, so k ≥ total − n
        c = recycle_sizes(n - k)[1]
        if k + c == total:
            best = (k, c)
    if best is None:
        raise VtpruneError(f"sparsevlm: no top-k size on {n} tokens gives {total} tokens after recycling")
    return best


def layer_average(n: int, counts, stage_layers, num_layers: int) -> float:
    """True n̄ (spec README §4, input convention): stage s acts at the input of `stage_layers[s]`."""
    total, cur, prev = 0, n, 0
    for layer, count in zip(stage_layers, counts, strict=True):
        total += (layer - prev) * cur
        cur, prev = count, layer
    return (total + (num_layers - prev) * cur) / num_layers


def authors_counter(n: int, counts, stage_layers, num_layers: int) -> float:
    """The SparseVLM authors' average: each pruning layer counted at its post-pruning size (one layer less
    at the larger count per stage)."""
    return layer_average(n, counts, [s - 1 for s in stage_layers], num_layers)


def heads_kept(num_heads: int) -> int:
    """SparseVLM+ heads averaged: 14 of 32 (Source), `max(1, min(H, round_half_up(14·H/32)))` otherwise."""
    return max(1, min(num_heads, round_half_up(V2_HEADS * num_heads / REF_HEADS)))


def gravity_relevance(heads: torch.Tensor, gravity: torch.Tensor, raters: torch.Tensor):
    """SparseVLM+ relevance: per-head rater rows divided by the RoPE gravity, top heads averaged, fp32.

    heads (H, T_s, n) per-head attention, gravity (T_s, n) W, raters (T_s,) bool -> (rel (n,), kept heads (h,)
    sorted): `G_h[t, j] = A_h[t, j] / W[t, j]` over the raters, the `heads_kept(H)` heads with the largest
    `Σ_{t,j} G_h[t, j]` (ties to the lower head), `rel_j = mean_{h, t} G_h[t, j]`.
    """
    g = heads[:, raters].float() / gravity[raters].float()[None]  # (H, |R|, n)
    chosen = stable_topk(g.sum((1, 2)), heads_kept(int(heads.shape[0])))
    return g[chosen].mean((0, 1)), chosen


def rater_scores(visual: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """`m_t = mean_i softmax_t(V_e T_eᵀ)[i, t]` in fp32.  visual (n, D), suffix (T_s, D) -> (T_s,), sums to 1."""
    return (visual.float() @ suffix.float().T).softmax(dim=1).mean(0)


def rater_mask(visual: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
    """Raters `{t : m_t > mean_t m_t}`, all suffix tokens when none.  -> (T_s,) bool."""
    m = rater_scores(visual, suffix)
    raters = m > m.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of the rows, fp32 rounding of an fp64 computation.  (m, D) -> (m, m).

    ‖x̃_i‖² + ‖x̃_j‖² − 2 x̃_i·x̃_j on the centred rows x̃ in fp64 (one GEMM): the centring removes the
    components all rows share (an LLM's large common hidden-state dimensions), so the fp64 cancellation
    error stays far below fp32 resolution; the result equals fp64 `cdist` rounded to fp32 (fp32 `cdist`'s direct
    summation differs by < 1e-5 relative), ≈ 10× faster than the direct fp32 `cdist` at m ≈ 750,
    D = 4096 on one CPU thread (tests/test_perf_selection.py).
    """
    x64 = x.double()
    x64 = x64 - x64.mean(0)
    sq = x64.square().sum(1)
    d2 = (sq[:, None] + sq[None, :]).sub_(x64 @ x64.T, alpha=2.0).clamp_(min=0.0)
    return d2.sqrt_().float()


def dpc_knn(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering (reference `cluster_and_merge`) of m points into c clusters, fp32.

    x (m, D) -> (centres (c,) sorted point indices, labels (m,) in [0, c) indexing `centres`).
    Density `rho = exp(−mean of the c smallest squared distances)` (self included), `delta` = distance to the
    nearest denser point (largest distance when none), centres = top-c of rho·delta (ties to the lower
    index); every point joins its nearest centre (ties to the lower centre), centres join themselves.
    """
    x = x.float()
    m, d = x.shape
    dist = pairwise_distance(x) / math.sqrt(d)  # (m, m)
    dist.fill_diagonal_(0.0)
    knn = dist.topk(c, dim=1, largest=False).values  # (m, c)
    rho = (-(knn**2).mean(1)).exp()
    denser = rho[None, :] > rho[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(1).values
    centres = stable_topk(rho * delta, c)
    labels = dist[centres].argmin(0)  # first minimum: ties to the lower centre
    labels[centres] = torch.arange(c, device=x.device)
    return centres, labels


def cluster_means(x: torch.Tensor, labels: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster's members in fp32.  x (m, D), labels (m,) -> ((c, D), counts (c,))."""
    x = x.float()
    total = torch.zeros(c, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, labels, x)
    count = torch.zeros(c, dtype=torch.float32, device=x.device).index_add_(0, labels, torch.ones_like(x[:, 0]))
    return total / count[:, None], count


def recycle(features: torch.Tensor, rel: torch.Tensor, k: int, c: int):
    """Top-k by `rel` plus c recycled cluster means of the most relevant dropped tokens.

    features (n, D), rel (n,) -> (keep_idx (k + c,) sorted, new_feats (k + c, D) in features' dtype,
    weights (k + c,) tokens represented, reference_order (k + c,)). Recycled rows sit at their centre's index;
    `reference_order` lists the outputs as the reference emits them: the kept tokens in candidate order, then
    the recycled ones in cluster order (a `KeepPlan.order`).
    """
    n = features.shape[0]
    order = torch.sort(rel.float(), descending=True, stable=True).indices
    kept, dropped = order[:k], order[k:]
    m, c_ref = recycle_sizes(n - k)
    if c != c_ref:
        raise VtpruneError(f"sparsevlm: {c} recycled clusters requested, the rule gives {c_ref}")
    chosen = dropped[:m].sort().values  # ascending candidate index: ties go to the lower index
    centres, labels = dpc_knn(features[chosen], c)
    merged, count = cluster_means(features[chosen], labels, c)
    keep = torch.cat([kept, chosen[centres]])
    feats = torch.cat([features[kept].float(), merged])
    weights = torch.cat([torch.ones(k, dtype=torch.float32, device=count.device), count])
    idx = keep.argsort()
    at = idx.argsort()  # output slot (in sorted keep_idx) of each entry of `keep`
    reference_order = torch.cat([at[:k].sort().values, at[k:]])
    return keep[idx], feats[idx].to(features.dtype), weights[idx], reference_order


@register
class SparseVLM(PruningMethod):
    """Rater-attention ranking at three decoder layers with token recycling (v1.5), or SparseVLM+ (v2.0)."""

    name = "sparsevlm"
    config_class = SparseVLMConfig
    merges = True
    #: "reference": same tokens, in the reference's order (recycled last) with contiguous ids (`positions="reindex"`).
    presets = ("default", "reference")

    def __init__(self, config: SparseVLMConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.version not in VERSIONS:
            raise VtpruneError(f"sparsevlm version must be one of {VERSIONS}, got {c.version!r}")
        if c.schedule not in SCHEDULES:
            raise VtpruneError(f"sparsevlm schedule must be one of {SCHEDULES}, got {c.schedule!r}")
        if c.recycle is not None and not isinstance(c.recycle, bool):
            raise VtpruneError(f"sparsevlm recycle must be True, False or None, got {c.recycle!r}")
        self.v2 = c.version == "2.0"
        if self.v2 and c.recycle:
            raise VtpruneError("sparsevlm version='2.0' (SparseVLM+) does not recycle tokens; drop recycle=True")
        #: recycling on (v1.5 default) or off (v2.0, or recycle=False)
        self.recycle = (not self.v2) if c.recycle is None else c.recycle
        self.rows = ROWS_V2 if self.v2 else ROWS  # kept counts k_ℓ per table row
        self.merges = self.recycle  # recycling off: selection only (masking-equivalent)
        #: (stage, n before, total after) -> top-k size chosen by `schedule` (None when two schedules disagree)
        self._splits: dict[tuple[int, int, int], int | None] = {}

    # --- structure ----------------------------------------------------------------------------------
    def stage_layers(self, num_layers: int | None = None) -> tuple[int, ...]:
        """The `llm:k` layers of the three stages (pruning after layer k − 1)."""
        return tuple(p + 1 for p in prune_layers(num_layers or self.num_layers or REF_LAYERS))

    def stages(self) -> tuple[Stage, ...]:
        return tuple(Stage("llm", k) for k in self.stage_layers())

    def validate(self, num_layers: int) -> None:
        if self.stage_layers(num_layers)[-1] >= num_layers:
            raise VtpruneError(
                f"sparsevlm prunes after three distinct decoder layers (2, 6, 15 of 32, scaled to the depth); "
                f"a language model with {num_layers} layers is too shallow (it needs at least 4)"
            )
        super().validate(num_layers)

    def signals(self, stage_index: int) -> frozenset[str]:
        rows = {"suffix_attention_heads", "suffix_rope_gravity"} if self.v2 else {"suffix_attention"}
        return frozenset(rows | {"suffix_embeddings", "visual_embeddings"})

    # --- budgets ------------------------------------------------------------------------------------
    def row_for(self, n: int, budget: int, num_layers: int) -> int:
        """The table row whose share of n the budget is (`|B − n·label/576| < 1.5`, nearest)."""
        dist, label = min((abs(budget - n * lab / REF_N), -lab) for lab in ROWS)
        if dist < 1.5:
            return -label
        shares = ", ".join(f"{lab} → {round_half_up(n * lab / REF_N)}" for lab in ROWS)
        first = self.stage_layers(num_layers)[0]
        floor_ = first * n / num_layers
        note = (
            f"; no schedule can reach it: the first {first} layers alone give n̄ ≥ {first}·N/L = {floor_:g}"
            if budget < floor_
            else "; schedule='matched' scales the nearest row to any feasible budget"
        )
        raise BudgetError(
            f"sparsevlm schedule='reference' has table rows for the budgets (of {REF_N}) {shares} tokens of "
            f"N = {n}; got {budget}{note}"
        )

    def schedule(self, n: int, budget: int, mode: str, num_layers: int) -> list[int]:
        c = self.config
        if budget >= n:
            return [n] * 3
        row = self.row_for(n, budget, num_layers) if c.schedule == "reference" else self._nearest_row(n, budget)
        base = [n * k / REF_N for k in self.rows[row]]
        if c.schedule == "reference":
            ks = [round_half_up(b) for b in base]
        else:
            ks = self._matched(n, budget, mode, num_layers, base)
        return self._remember(n, ks)

    def _remember(self, n: int, ks: list[int]) -> list[int]:
        """Counts after each stage for kept sizes `ks`, remembering each stage's top-k size for `select`."""
        out, cur = [], n
        for s, k_l in enumerate(ks):
            k, after = stage_count(cur, k_l, self.recycle)
            key = (s, cur, after)
            self._splits[key] = k if self._splits.get(key, k) == k else None
            out.append(after)
            cur = after
        return out

    @staticmethod
    def _nearest_row(n: int, budget: int) -> int:
        return -min((abs(budget - n * lab / REF_N), -lab) for lab in ROWS)[1]

    def _matched(self, n: int, budget: int, mode: str, num_layers: int, base: list[float]) -> list[int]:
        """Kept sizes k_ℓ = round_half_up(s·base_ℓ) with the common factor s that brings the metric closest."""
        layers = self.stage_layers(num_layers)

        def ks(s: float) -> list[int]:
            return [round_half_up(s * b) for b in base]

        def counts(s: float) -> list[int]:
            return stage_counts(n, ks(s), self.recycle)

        def metric(cs: list[int]) -> float:
            return cs[0] if mode == "retained" else layer_average(n, cs, layers, num_layers)

        low = metric(counts(0.0))
        if low > budget:
            what = "tokens after the first stage" if mode == "retained" else "n̄"
            stay = " and recycled clusters stay" if self.recycle else ""
            raise BudgetError(
                f"sparsevlm schedule='matched': a {mode} budget of {budget} is infeasible for {n} visual tokens on "
                f"{num_layers} layers (the first {layers[0]} layers run on all N{stay}, so "
                f"{what} ≥ {low:g}); the smallest feasible budget is {math.ceil(low)}"
            )
        lo, hi = 0.0, n / min(base) + 1.0  # at hi every k_ℓ ≥ n: nothing is removed (metric = n > budget)
        for _ in range(60):
            mid = (lo + hi) / 2
            if metric(counts(mid)) >= budget:
                hi = mid
            else:
                lo = mid
        return ks(hi) if abs(metric(counts(hi)) - budget) < abs(metric(counts(lo)) - budget) else ks(lo)

    # --- selection ----------------------------------------------------------------------------------
    def raters(self, image: ImageTokens) -> torch.Tensor:
        """(T_s,) bool rater mask, computed once per image (first stage) and kept in `image.memo`."""
        raters = image.memo.get("sparsevlm_raters")
        if raters is None:
            raters = rater_mask(image.signals["visual_embeddings"], image.signals["suffix_embeddings"])
            image.memo["sparsevlm_raters"] = raters
        return raters

    def relevance(self, image: ImageTokens) -> torch.Tensor:
        """rel (n,) fp32: rater rows of `suffix_attention` averaged (v1.5), or `gravity_relevance` (v2.0)."""
        rows = image.signals["suffix_attention_heads" if self.v2 else "suffix_attention"]  # ([H,] T_s, n)
        if rows.shape[-2] == 0:
            raise VtpruneError("sparsevlm needs text after the image (the question span is empty)")
        raters = self.raters(image).to(rows.device)
        if self.v2:
            rel, chosen = gravity_relevance(rows, image.signals["suffix_rope_gravity"], raters)
            image.memo.setdefault("sparsevlm_heads", []).append(chosen)  # per stage, for diagnostics
            return rel
        return rows[raters].float().mean(0)

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        rel = self.relevance(image)  # (n,)
        if not self.recycle:
            return KeepPlan(stable_topk(rel, k))
        k_top = self._splits.get((stage_index, image.n, k))
        if k_top is None:
            k_top, c = split_count(image.n, k)
        else:
            c = k - k_top
        keep, feats, weights, reference_order = recycle(image.features, rel, k_top, c)
        return KeepPlan(keep, feats, weights, order=reference_order if self.config.preset == "reference" else None)

    def required_positions(self) -> str | None:
        """v1.5 `preset="reference"` emits the reference's order (recycled tokens last): contiguous ids."""
        return "reindex" if self.config.preset == "reference" and self.recycle else None
