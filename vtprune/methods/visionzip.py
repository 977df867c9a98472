"""VisionZip (CVPR 2025): dominant tokens by CLIP [CLS] attention + a few merged contextual tokens.

Spec: visionzip.md. Per vision view (LLaVA-1.5: the image; LLaVA-NeXT: the base view and each CLIP tile;
per-view quotas, README §8) with quota K: `K_dom = round(dominant·K/(dominant + contextual))`
(54:10 → 162+30 / 108+20 / 54+10 for 192/128/64), `K_ctx = K − K_dom` (≥ 1 when K ≥ 2).

CLIP models (LLaVA-1.5 / NeXT: the engine gives `vision_features` F, the feature layer's patch outputs before
the projector, `vision_cls_features`, that layer's [CLS] output row per view, and `ImageTokens.project`):
1. K_dom counts the [CLS] token: dominant = [CLS] + the top-(K_dom − 1) patches by `cls_attention`
   (stable ties);
2. the remaining R patches in raster order; targets at `0, step, 2·step, …` (first K_ctx),
   `step = max(1, R // K_ctx)`;
3. every other remaining patch joins the target whose head-mean CLIP key (`vision_head_keys`, the spec's
   metric M) is most cosine-similar (ties to the earlier target);
4. contextual token = `F[target] + mean(F[assigned])` (`merge="reference"`) or the mean of the target and its
   assigned rows (`merge="mean"`), merged in fp32 on F (pre-projector) and then projected; its
   representative is the target patch;
5. the K tokens enter the LLM through the projector (token-wise: a dominant patch's token is its projector
   output, taken as is; the [CLS] token is `project(F_cls)`). The [CLS] is no candidate: it is an *inserted*
   token (`KeepPlan.inserted`) placed right before its view's first candidate slot, whose position id it
   takes (ids non-decreasing, repeated once when that patch is kept too).
Qwen2.5-VL (no [CLS], no pre-projector features; spec "Model-specific handling"): all K_dom dominant tokens
are patches and contextual tokens are merged on the merger outputs (LLM space).

Order and positions: default = ascending representative index with each view's [CLS] first (`keep` ids).
`preset="reference"` (needs `positions="reindex"`, checked at `apply`): the reference order with contiguous
ids: per view [CLS, dominant patches in raster order, contextual tokens in target order]; for LLaVA-NeXT the
reference's tile layout after the base view: every tile's dominant patches in (unpadded) tile-grid raster
order, then every tile's [CLS], then every tile's contextual tokens, tile by tile (the reference re-lays the
dominant patches on the *padded* tile grid; vtprune's candidates are valid positions only, README §8).

Cost: the [CLS] row, keys and patch outputs of one CLIP layer (engine signals), O(R·K_ctx·d_h) similarities,
one projector pass over K_ctx + 1 rows per view; prefill FLOPs are those of K pre-LLM tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import largest_remainder_split
from ..errors import VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option, stable_topk

#: Signals used when the model provides them (CLIP models): pre-projector merging and the [CLS] token.
CLIP_SIGNALS = frozenset({"vision_features", "vision_cls_features"})


@dataclass
class VisionZipConfig(MethodConfig):
    #: Dominant : contextual split of each view's quota (Source: 54 + 10 at 64 tokens; K_dom counts [CLS]).
    dominant: int = option(54, ge=0)
    contextual: int = option(10, ge=0)
    #: "reference" (target + mean of assigned) or "mean" (mean of target and assigned).
    merge: str = option("reference", choices=("reference", "mean"))


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
    """One view's dominant patches and contextual tokens.

    feats (n, C) features to merge, metric (n, m), scores (n,) -> dom (k_dom,) sorted local indices, targets
    (k_ctx,) local indices in target order (ascending), ctx (k_ctx, C) fp32 merged features, counts (k_ctx,)
    tokens merged into each target besides itself.
    """
    n, dev = feats.shape[0], feats.device
    dom = stable_topk(scores, k_dom)
    if k_ctx == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return dom, empty, torch.zeros(0, feats.shape[1], device=dev), torch.zeros(0, device=dev)
    is_rest = torch.ones(n, dtype=torch.bool, device=dev)
    is_rest[dom] = False
    rest = is_rest.nonzero().flatten()  # raster order
    step = max(1, len(rest) // k_ctx)
    tgt_pos = torch.arange(0, len(rest), step, device=dev)[:k_ctx]
    is_tgt = torch.zeros(len(rest), dtype=torch.bool, device=dev)
    is_tgt[tgt_pos] = True
    targets, others = rest[is_tgt], rest[~is_tgt]
    m = F.normalize(metric.float(), dim=1)
    assign = (m[others] @ m[targets].T).argmax(1)  # first maximum: ties to the earlier target
    f = feats.float()
    total = torch.zeros(k_ctx, f.shape[1], device=dev).index_add_(0, assign, f[others])
    count = torch.zeros(k_ctx, device=dev).index_add_(0, assign, torch.ones(len(others), device=dev))
    if merge == "reference":
        ctx = f[targets] + total / count.clamp(min=1.0)[:, None]
    else:
        ctx = (f[targets] + total) / (1.0 + count)[:, None]
    return dom, targets, ctx, count


@register
class VisionZip(PruningMethod):
    """Dominant ([CLS] + [CLS]-attention) + contextual (merged by key similarity) tokens, per view, before the LLM."""

    name = "visionzip"
    config_class = VisionZipConfig
    merges = True
    inserts = True  # the CLIP [CLS] token
    #: "reference": the reference token order with contiguous ids (`positions="reindex"`).
    presets = ("default", "reference")

    def __init__(self, config: VisionZipConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.merge not in ("reference", "mean"):
            raise VtpruneError(f"visionzip merge must be 'reference' or 'mean', got {c.merge!r}")
        if c.dominant < 0 or c.contextual < 0 or c.dominant + c.contextual == 0:
            raise VtpruneError(
                f"visionzip needs dominant, contextual >= 0 and not both 0, got {c.dominant}, {c.contextual}"
            )

    def required_positions(self) -> str | None:
        return "reindex" if self.config.preset == "reference" else None

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("vision"),)

    def signals(self, stage_index: int) -> frozenset[str]:
        wanted = frozenset({"cls_attention", "vision_head_keys"})
        if self.available_signals is not None:  # CLIP models: merge before the projector, add the [CLS]
            wanted |= CLIP_SIGNALS & self.available_signals
        return wanted

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        c = self.config
        sig = image.signals
        scores, metric = sig["cls_attention"], sig["vision_head_keys"]
        vis, cls_rows = sig.get("vision_features"), sig.get("vision_cls_features")
        if (vis is not None or cls_rows is not None) and image.project is None:
            raise VtpruneError("visionzip: pre-projector features need the model's projector (ImageTokens.project)")
        space = vis if vis is not None else image.features  # where contextual tokens are merged
        view_of = image.view
        members = image.view_members()
        quotas = largest_remainder_split(k, [len(m) for m in members])
        parts = []  # per view with a quota: (view, members, dom, targets, ctx, count, has_cls); global indices
        for idx, q in zip(members, quotas, strict=True):
            if q == 0:
                continue
            k_dom, k_ctx = split_budget(q, c.dominant, c.contextual)
            has_cls = cls_rows is not None and k_dom >= 1
            dom, tgt, ctx, count = visionzip_crop(
                space[idx], metric[idx], scores[idx], k_dom - int(has_cls), k_ctx, c.merge
            )
            parts.append((int(view_of[idx[0]]), idx, idx[dom], idx[tgt], ctx, count, has_cls))

        ctx_all = torch.cat([p[4] for p in parts])  # (ΣK_ctx, C) fp32
        cls_views = [p[0] for p in parts if p[6]]
        if vis is not None or cls_views:  # one projector pass for the contextual rows and the [CLS] rows
            rows = [ctx_all.to(space.dtype)] if vis is not None else []
            if cls_views:
                rows.append(cls_rows[torch.tensor(cls_views, device=cls_rows.device)].to(space.dtype))
            projected = image.project(torch.cat(rows)).to(image.features.dtype)
            n_ctx = len(ctx_all) if vis is not None else 0
            ctx_out, cls_out = projected[:n_ctx], projected[n_ctx:]
            if vis is None:
                ctx_out = ctx_all.to(image.features.dtype)
        else:
            ctx_out, cls_out = ctx_all.to(image.features.dtype), None

        dom_idx = torch.cat([p[2] for p in parts])
        tgt_idx = torch.cat([p[3] for p in parts])
        keep = torch.cat([dom_idx, tgt_idx])
        feats = torch.cat([image.features[dom_idx], ctx_out])
        weights = torch.cat([torch.ones(len(dom_idx)), 1.0 + torch.cat([p[5] for p in parts]).cpu()])
        order = keep.argsort()
        keep_idx = keep[order]
        plan = KeepPlan(keep_idx, feats[order], weights[order.cpu()])
        cls_token = torch.zeros(0, dtype=torch.long, device=keep_idx.device)  # token id of each [CLS], view order
        if cls_views:
            at = torch.stack([p[1][0] for p in parts if p[6]])  # each view's first candidate slot
            by_slot = torch.sort(at, stable=True).indices
            plan.inserted, plan.insert_at = cls_out[by_slot], at[by_slot]
            cls_token = len(keep_idx) + torch.argsort(by_slot)
        if c.preset == "reference":
            plan.order = _reference_order(parts, keep_idx, cls_token, several_views=image.tile is not None)
        return plan


def _reference_order(parts, keep_idx: torch.Tensor, cls_token: torch.Tensor, several_views: bool) -> torch.Tensor:
    """Token ids (kept slots 0..K−1 in `keep_idx` order; `cls_token` (n_cls,): ids of the inserted [CLS] of the
    views that have one, in view order) in the reference order: per view [CLS, dominant (raster), contextual
    (target order)]; with tiles (LLaVA-NeXT) the base view so, then the tiles as [every tile's dominant
    (tile-grid raster), every tile's [CLS], every tile's contextual tokens, tile by tile]."""
    head, tiles, e = [], [], 0
    for view, _, dom, tgt, _, _, has_cls in parts:  # one iteration per view
        cls = cls_token[e : e + int(has_cls)]
        e += int(has_cls)
        block = (cls, torch.searchsorted(keep_idx, dom), torch.searchsorted(keep_idx, tgt))
        (tiles if several_views and view != 0 else head).append(block)
    out = [torch.cat(block) for block in head]
    if tiles:  # kept slots ascend with the candidate index: sorted slots = tile-grid raster order
        out += [torch.cat([b[1] for b in tiles]).sort().values, *(b[0] for b in tiles), *(b[2] for b in tiles)]
    return torch.cat(out)
