"""DivPrune (CVPR 2025): keep the K most mutually diverse visual tokens (spec divprune.md).

Greedy max–min on cosine distance `D = 1 − V̂V̂ᵀ` of the projector outputs (fp32): the first pick is
the most isolated token (largest distance to its nearest other token, i.e. the second-smallest value
of its column), each next pick maximises the minimum distance to the tokens already chosen (chosen
tokens masked with −∞, ties to the lower index). One global selection over all crops. Selection only.

Cost: the N×N distance matrix, O(N²·D) (≈ 2.7 GFLOP at N = 576, D = 4096; ≈ 68 GFLOP at N = 2880, of
which the symmetric block product computes ≈ 62 %) and O(N²) fp32 memory; then K sequential greedy steps
of O(N) each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option


@dataclass
class DivPruneConfig(MethodConfig):
    #: Paper notation: retained fraction (reference `SUBSET_RATIO`), K = round(r·N); overrides the budget.
    r: float | None = option(None, gt=0.0, lt=1.0)


def symmetric_gram(v: torch.Tensor, block: int = 768) -> torch.Tensor:
    """`v vᵀ` computed one row block at a time against the blocks at and after it, mirrored below the
    diagonal (≈ (B+1)/(2B) of the full product's FLOPs for B blocks).  (n, D) -> (n, n).

    Every entry is one dot product of the same GEMM inner loop as `v @ v.T` (checked equal in
    tests/test_perf_selection.py); small n uses the plain product.
    """
    n = v.shape[0]
    if n <= block:
        return v @ v.T
    block = -(-n // -(-n // block))  # equal blocks (no thin tail block with its own kernel path)
    out = torch.empty(n, n, dtype=v.dtype, device=v.device)
    for i in range(0, n, block):
        rows = v[i : i + block] @ v[i:].T  # (b, n − i)
        out[i : i + block, i:] = rows
        out[i + block :, i : i + block] = rows[:, block:].T
    return out


def cosine_distance(feats: torch.Tensor) -> torch.Tensor:
    """`1 − V̂V̂ᵀ` in fp32.  (n, D) -> (n, n)."""
    v = F.normalize(feats.float(), dim=1)
    return symmetric_gram(v).neg_().add_(1.0)  # same rounding as 1.0 − G, no second n×n buffer


def divprune_order(feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy max–min picks in pick order and the score each pick achieved.  (n, D) -> ((k,), (k,)).

    The achieved score of pick 1 is its nearest-neighbour distance; of pick t > 1 its minimum distance
    to the picks before it.
    """
    dist = cosine_distance(feats)
    n = dist.shape[0]
    # second-smallest of each column (= kthvalue(2), ~10× faster on CPU at n = 2880)
    score = dist.topk(2, dim=0, largest=False).values[1] if n > 1 else torch.zeros(1, device=dist.device)
    taken = torch.zeros(n, dtype=torch.bool, device=dist.device)
    order = torch.empty(k, dtype=torch.long, device=dist.device)
    achieved = torch.empty(k, dtype=torch.float32, device=dist.device)
    for t in range(k):
        masked = score.masked_fill(taken, float("-inf"))
        j = masked.argmax()  # first maximum: ties to the lower index
        order[t], achieved[t] = j, masked[j]
        taken[j] = True
        score = dist[j] if t == 0 else torch.minimum(score, dist[j])
    return order, achieved


def divprune_order_batched(feats: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """`divprune_order`'s picks for several images in one greedy loop (padded to the largest n).

    feats: per image (n_b, D) on one device; ks: picks per image -> per image the picks (k_b,) in pick order.
    Distances in one `bmm` (B, N, N); padding rows never count as a nearest neighbour and are never picked."""
    dev, n_max, bsz = feats[0].device, max(f.shape[0] for f in feats), len(feats)
    v = torch.zeros(bsz, n_max, feats[0].shape[1], device=dev)  # (B, N, D) unit rows, zero padding
    valid = torch.zeros(bsz, n_max, dtype=torch.bool, device=dev)
    for b, f in enumerate(feats):
        v[b, : f.shape[0]] = F.normalize(f.float(), dim=1)
        valid[b, : f.shape[0]] = True
    dist = torch.bmm(v, v.transpose(1, 2)).neg_().add_(1.0)  # (B, N, N)
    far = dist.masked_fill(~valid[:, :, None], float("inf"))  # padding rows are nobody's neighbour
    score = far.topk(min(2, n_max), dim=1, largest=False).values[:, -1]  # (B, N) second-smallest per column
    score = torch.where(valid.sum(1, keepdim=True) > 1, score, torch.zeros_like(score))
    blocked = ~valid
    rows = torch.arange(bsz, device=dev)
    order = torch.empty(bsz, max(ks), dtype=torch.long, device=dev)
    for t in range(max(ks)):
        j = score.masked_fill(blocked, float("-inf")).argmax(1)  # (B,) first maximum: ties to the lower index
        order[:, t] = j
        blocked[rows, j] = True
        score = dist[rows, j] if t == 0 else torch.minimum(score, dist[rows, j])
    return [order[b, :k] for b, k in enumerate(ks)]


@register
class DivPrune(PruningMethod):
    """Max–min diversity selection on the projector outputs, before the LLM."""

    name = "divprune"
    config_class = DivPruneConfig
    #: "reference": the selection is identical; the reference's contiguous ids are `positions="reindex"`
    #: at `vtprune.apply` (and its NeXT newline candidates are an engine matter, see the report).
    presets = ("default", "reference")

    def __init__(self, config: DivPruneConfig | None = None):
        super().__init__(config)
        if self.config.r is not None and not 0.0 < self.config.r < 1.0:
            raise VtpruneError(f"divprune retained fraction r must lie in (0, 1), got {self.config.r!r}")

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("pre_llm"),)

    def schedule(self, n: int, budget: int, mode: str, num_layers: int) -> list[int]:
        if self.config.r is not None:
            return [min(n, max(1, math.floor(self.config.r * n + 0.5)))]
        return [min(budget, n)]

    #: the batched loop on CPU too (tests); by default only accelerators batch (per-image loops launch-bound)
    batch_on_cpu: bool = False

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        order, _ = divprune_order(image.features, k)
        return KeepPlan(order.sort().values)

    def select_batch(self, stage_index: int, images: list[ImageTokens], ks: list[int]) -> list[KeepPlan]:
        """All images of a forward in one greedy loop on accelerators (`divprune_order_batched`)."""
        if len(images) < 2 or (images[0].features.device.type == "cpu" and not self.batch_on_cpu):
            return super().select_batch(stage_index, images, ks)
        orders = divprune_order_batched([im.features for im in images], ks)
        return [KeepPlan(o.sort().values) for o in orders]
