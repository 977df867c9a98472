"""VisionZip (CVPR 2025): dominant tokens by CLIP [CLS] attention + a few merged contextual tokens.

Spec: visionzip.md. Per crop (per-crop quotas, README §8) with quota K:
`K_dom = round(dominant·K/(dominant + contextual))` (54:10 → 162+30 / 108+20 / 54+10 for 192/128/64),
`K_ctx = K − K_dom` (≥ 1 when K ≥ 2).
1. dominant = top-K_dom patches by `cls_attention` (stable ties);
2. the remaining R patches in raster order; targets at `0, step, 2·step, …` (first K_ctx),
   `step = max(1, R // K_ctx)`;
3. every other remaining patch joins the target whose head-mean CLIP key is most cosine-similar
   (ties to the earlier target);
4. contextual token = `f[target] + mean(f[assigned])` (`merge="reference"`) or the mean of the target and
   its assigned tokens (`merge="mean"`); its representative is the target patch.
Output sorted by representative index (`keep` ids). Cost: the [CLS] row and keys of one CLIP layer (engine
signals) and O(R·K_ctx·d_h) similarities; prefill FLOPs are those of K pre-LLM tokens.

Deviations on LLaVA, forced by what the engine gives a method (see the module report):
- no [CLS] candidate: HF LLaVA drops the [CLS] feature, so its slot in K_dom goes to the next patch in
  [CLS]-attention order (all K_dom dominant tokens are patches);
- merging is done on the projector outputs (LLM space, as the spec prescribes for Qwen2.5-VL) instead of
  on the layer-22 CLIP features before the projector;
- the similarity metric averages the `vision_keys` (n, C) over `vision_heads` heads of C/H channels;
  the engine does not pass the head count (CLIP ViT-L/14: 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import largest_remainder_split
from ..errors import VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, stable_topk


@dataclass
class VisionZipConfig(MethodConfig):
    #: Dominant : contextual split of each crop's quota (Source: 54 + 10 at 64 tokens).
    dominant: int = 54
    contextual: int = 10
    #: "reference" (target + mean of assigned) or "mean" (mean of target and assigned).
    merge: str = "reference"
    #: Heads of the CLIP layer whose keys are averaged into the similarity metric.
    vision_heads: int = 16


def split_budget(k: int, dominant: int = 54, contextual: int = 10) -> tuple[int, int]:
    """(K_dom, K_ctx) for a quota K: `K_dom = round(dominant·K/(dominant+contextual))`, K_ctx ≥ 1 if K ≥ 2."""
    k_dom = math.floor(dominant * k / (dominant + contextual) + 0.5)
    k_dom = min(max(k_dom, 0), k)
    if contextual > 0 and k >= 2 and k_dom == k:
        k_dom = k - 1
    if dominant > 0 and k >= 1 and k_dom == 0:
        k_dom = 1
    return k_dom, k - k_dom


def visionzip_crop(feats, metric, scores, k_dom: int, k_ctx: int, merge: str = "reference"):
    """One crop. feats (n, D), metric (n, m), scores (n,) -> (keep (K,) sorted, new feats (K, D), weights (K,)).

    Indices are local to the crop; dominant rows keep their features, target rows get the merged ones.
    """
    n = feats.shape[0]
    dom = stable_topk(scores, k_dom)
    if k_ctx == 0:
        return dom, feats[dom], torch.ones(k_dom)
    is_rest = torch.ones(n, dtype=torch.bool, device=feats.device)
    is_rest[dom] = False
    rest = is_rest.nonzero().flatten()  # raster order
    step = max(1, len(rest) // k_ctx)
    tgt_pos = torch.arange(0, len(rest), step, device=feats.device)[:k_ctx]
    is_tgt = torch.zeros(len(rest), dtype=torch.bool, device=feats.device)
    is_tgt[tgt_pos] = True
    targets, others = rest[is_tgt], rest[~is_tgt]
    m = F.normalize(metric.float(), dim=1)
    assign = (m[others] @ m[targets].T).argmax(1)  # first maximum: ties to the earlier target
    f = feats.float()
    total = torch.zeros(k_ctx, f.shape[1], device=f.device).index_add_(0, assign, f[others])
    count = torch.zeros(k_ctx, device=f.device).index_add_(0, assign, torch.ones(len(others), device=f.device))
    if merge == "reference":
        ctx = f[targets] + total / count.clamp(min=1.0)[:, None]
    else:
        ctx = (f[targets] + total) / (1.0 + count)[:, None]
    keep = torch.cat([dom, targets])
    new = torch.cat([feats[dom].float(), ctx])
    weights = torch.cat([torch.ones(k_dom), 1.0 + count.cpu()])
    order = keep.argsort()
    return keep[order], new[order].to(feats.dtype), weights[order.cpu()]


@register
class VisionZip(PruningMethod):
    """Dominant ([CLS]-attention) + contextual (merged by key similarity) tokens, per crop, before the LLM."""

    name = "visionzip"
    config_class = VisionZipConfig
    merges = True
    #: "reference": same tokens; the reference's contiguous ids are `positions="reindex"` at `vtprune.apply`.
    presets = ("default", "reference")

    def __init__(self, config: VisionZipConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.merge not in ("reference", "mean"):
            raise VtpruneError(f"visionzip merge must be 'reference' or 'mean', got {c.merge!r}")
        if c.dominant < 0 or c.contextual < 0 or c.dominant + c.contextual == 0:
            raise VtpruneError(f"visionzip needs dominant, contextual >= 0 and not both 0, got {c.dominant}, "
                               f"{c.contextual}")
        if c.vision_heads < 1:
            raise VtpruneError(f"visionzip vision_heads must be >= 1, got {c.vision_heads}")

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("vision"),)

    def signals(self, stage_index: int) -> frozenset[str]:
        return frozenset({"cls_attention", "vision_keys"})

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        c = self.config
        keys = image.signals["vision_keys"]
        if keys.shape[1] % c.vision_heads:
            raise VtpruneError(f"visionzip: vision keys of width {keys.shape[1]} do not split into "
                               f"vision_heads={c.vision_heads} heads")
        metric = keys.float().reshape(image.n, c.vision_heads, -1).mean(1)
        scores = image.signals["cls_attention"]
        members = image.view_members()  # per vision view: LLaVA-NeXT base view and each tile
        quotas = largest_remainder_split(k, [len(m) for m in members])
        keep, feats, weights = [], [], []
        for idx, q in zip(members, quotas, strict=True):
            if q == 0:
                continue
            k_dom, k_ctx = split_budget(q, c.dominant, c.contextual)
            kp, fp, wp = visionzip_crop(image.features[idx], metric[idx], scores[idx], k_dom, k_ctx, c.merge)
            keep.append(idx[kp])
            feats.append(fp)
            weights.append(wp)
        keep_idx = torch.cat(keep)
        order = keep_idx.argsort()
        return KeepPlan(keep_idx[order], torch.cat(feats)[order], torch.cat(weights)[order.cpu()])
