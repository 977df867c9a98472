"""VisPruner (ICCV 2025): important tokens by CLIP [CLS] attention + diverse tokens by duplicate removal.

Spec: vispruner.md. Per crop (per-crop quotas, README §8) with quota T:
1. `T_imp = int(T·important_ratio)`, `T_div = T − T_imp`;
2. patches in descending `cls_attention` order (stable); the first T_imp are kept, the rest is the residual;
3. while the residual is longer than T_div: split it by alternate position (A = even slots, ⌈R/2⌉ items;
   B = odd slots), score each a ∈ A by its largest cosine similarity to B, order A by that score
   (descending, stable) and drop its first `min(8, R − T_div, |A|)` members; residual = rest of A + B;
4. keep important ∪ residual, sorted. Selection only.
Cost: one [CLS] row per crop (engine signal), one n_c×n_c cosine Gram matrix per crop (O(n_c²·D) fp32,
O(n_c²) memory) and ≈ (R − T_div)/8 sequential iterations, each an |A|×|B| gather and row max.

Similarity features: the feature layer's patch outputs before the projector (signal `vision_features`, the
spec's F) where the model provides them (LLaVA-1.5 / NeXT); the projector (merger) outputs otherwise
(Qwen2.5-VL, as the spec prescribes there).

`select_batch` can run the crops of a forward's images that share a size and a quota in one loop
(`vispruner_crops_batched`, ≈ 10× faster selection at batch 16 on an H200, where the per-crop loop's small steps
are launch-bound); it is off by default until a GPU run confirms identical kept sets (`batch_on_accelerators`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import largest_remainder_split
from ..errors import VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option

#: Tokens removed per duplicate-removal iteration (Source: fixed).
STEP = 8


@dataclass
class VisPrunerConfig(MethodConfig):
    #: Share of each crop's quota kept by [CLS] attention (r = 1: FasterVLM, no diverse tokens).
    important_ratio: float = option(0.5, ge=0.0, le=1.0)


def cosine_similarity(feats: torch.Tensor) -> torch.Tensor:
    """`V̂V̂ᵀ` in fp32.  (n, D) -> (n, n)."""
    fn = F.normalize(feats.float(), dim=1)
    return fn @ fn.T


def vispruner_crop(
    feats: torch.Tensor, scores: torch.Tensor, t: int, important_ratio: float, trace: list | None = None
) -> torch.Tensor:
    """One crop: local indices of the T kept tokens, sorted.  feats (n, D), scores (n,) -> (T,).

    trace: if a list, gets (A, B, removed) index tensors of every iteration (for tests).
    """
    t_imp = int(t * important_ratio)
    t_div = t - t_imp
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    imp, res = order[:t_imp], order[t_imp:]
    sim = cosine_similarity(feats)  # one Gram matrix per crop; each iteration only gathers its A×B block
    while t_div > 0:
        a, b = res[0::2], res[1::2]
        r = min(STEP, len(res) - t_div, len(a))
        if r <= 0:
            break
        dup = sim.index_select(0, a).index_select(1, b).max(1).values  # 2.5-4× faster than sim[a][:, b] on CPU
        a = a[torch.sort(dup, descending=True, stable=True).indices]
        if trace is not None:
            trace.append((res[0::2], b, a[:r]))
        res = torch.cat([a[r:], b])
    return torch.cat([imp, res[:t_div]]).sort().values  # T_div = 0 (r = 1): no residual token is kept


def vispruner_crops_batched(feats: torch.Tensor, scores: torch.Tensor, t: int, important_ratio: float) -> torch.Tensor:
    """`vispruner_crop` for C crops of the same size and quota in one loop (the iteration count and every
    length depend on n and T only, so the crops move in lockstep).  feats (C, n, D), scores (C, n) -> (C, T)."""
    t_imp = int(t * important_ratio)
    t_div = t - t_imp
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices  # (C, n)
    imp, res = order[:, :t_imp], order[:, t_imp:]
    # per crop, the very operations of `vispruner_crop` (a batched product rounds differently, and the order
    # of near-equal similarities decides which tokens go: measured on an H200, kept sets differed with `bmm`)
    sim = torch.stack([cosine_similarity(f) for f in feats])  # (C, n, n)
    n = sim.shape[1]
    while t_div > 0:
        a, b = res[:, 0::2], res[:, 1::2]
        r = min(STEP, res.shape[1] - t_div, a.shape[1])
        if r <= 0:
            break
        rows = sim.gather(1, a[:, :, None].expand(-1, -1, n))  # (C, |A|, n)
        dup = rows.gather(2, b[:, None, :].expand(-1, a.shape[1], -1)).max(2).values  # (C, |A|)
        a = a.gather(1, torch.sort(dup, dim=1, descending=True, stable=True).indices)
        res = torch.cat([a[:, r:], b], 1)
    return torch.cat([imp, res[:, :t_div]], 1).sort(1).values


@register
class VisPruner(PruningMethod):
    """Important ([CLS] attention) + diverse (iterative duplicate removal) tokens, per crop, before the LLM."""

    name = "vispruner"
    config_class = VisPrunerConfig
    #: "reference": same tokens; the reference's contiguous ids are `positions="reindex"` at `vtprune.apply`.
    presets = ("default", "reference")

    def __init__(self, config: VisPrunerConfig | None = None):
        super().__init__(config)
        if not 0.0 <= self.config.important_ratio <= 1.0:
            raise VtpruneError(f"vispruner important_ratio must lie in [0, 1], got {self.config.important_ratio!r}")

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("vision"),)

    def signals(self, stage_index: int) -> frozenset[str]:
        wanted = frozenset({"cls_attention"})
        if self.available_signals is not None and "vision_features" in self.available_signals:
            wanted |= {"vision_features"}  # CLIP models: similarity on the pre-projector patch features
        return wanted

    #: the batched loop on CPU too (tests)
    batch_on_cpu: bool = False
    #: the batched loop on accelerators: off until a GPU run shows kept sets identical to the per-crop loop
    #: (BENCHMARKS.md, GPU: the first batched version differed at near-ties; the similarities are now computed
    #: per crop exactly as the loop computes them, not yet re-measured on a GPU)
    batch_on_accelerators: bool = False

    @staticmethod
    def _crops(image: ImageTokens, k: int) -> list[tuple[torch.Tensor, int]]:
        """(candidate indices, quota) per vision view with a non-zero quota (LLaVA-NeXT: base view and each tile)."""
        members = image.view_members()
        quotas = largest_remainder_split(k, [len(m) for m in members])
        return [(idx, q) for idx, q in zip(members, quotas, strict=True) if q > 0]

    @staticmethod
    def _inputs(image: ImageTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity features (n, C) pre-projector where the model has them, else (n, D); [CLS] attention (n,))."""
        return image.signals.get("vision_features", image.features), image.signals["cls_attention"]

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        feats, scores = self._inputs(image)
        keep = [idx[vispruner_crop(feats[idx], scores[idx], q, self.config.important_ratio)]
                for idx, q in self._crops(image, k)]  # fmt: skip
        return KeepPlan(torch.cat(keep).sort().values)

    def select_batch(self, stage_index: int, images: list[ImageTokens], ks: list[int]) -> list[KeepPlan]:
        """With `batch_on_accelerators` (or `batch_on_cpu`), the crops of all images that share a size and a quota
        in one lockstep loop (`vispruner_crops_batched`): LLaVA-1.5's images all do, LLaVA-NeXT's tiles mostly."""
        on_cpu = images[0].features.device.type == "cpu" if images else True
        if len(images) < 2 or not (self.batch_on_cpu if on_cpu else self.batch_on_accelerators):
            return super().select_batch(stage_index, images, ks)
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for b, (image, k) in enumerate(zip(images, ks, strict=True)):
            for idx, q in self._crops(image, k):
                groups.setdefault((len(idx), q), []).append((b, idx))
        per_image: list[list[torch.Tensor]] = [[] for _ in images]
        for (_, q), crops in groups.items():
            inputs = [self._inputs(images[b]) for b, _ in crops]
            feats = torch.stack([f[idx] for (f, _), (_, idx) in zip(inputs, crops, strict=True)])
            scores = torch.stack([s[idx] for (_, s), (_, idx) in zip(inputs, crops, strict=True)])
            kept = vispruner_crops_batched(feats, scores, q, self.config.important_ratio)
            for (b, idx), sel in zip(crops, kept, strict=True):
                per_image[b].append(idx[sel])
        return [KeepPlan(torch.cat(keep).sort().values) for keep in per_image]
