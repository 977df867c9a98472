"""CDPruner (NeurIPS 2025): maximise the conditional diversity of the kept visual tokens (spec cdpruner.md).

Per image (per crop, README §8), in fp32:
1. similarity `S = V̂V̂ᵀ` of the projector outputs V (n_c, D);
2. relevance q (n_c,) to the instruction, min–max normalised *per crop of one image* (the reference
   normalised over the whole batch; that cross-sample coupling is a bug and is not reproduced):
   `r = (q − min q + 1e-6)/(max q − min q)`;
   - `relevance="clip"` (default; LLaVA-1.5/NeXT, Source): `E = visual_projection(post_layernorm(F))` of the
     projector-input CLIP patch features F (signal `vision_features`), `U` = CLIP text tower + projection of
     the user-question string (signal `question_text`) tokenised once, zero-padded (id 0, attention 0) to a
     multiple of 77 and cut into M rows; `q_i = mean_m(−Ê_i·Û_m)` (negative cosine, Source);
   - `relevance="llm"` (Qwen2.5-VL, Our decision): `q_i = cos(z_i, t̄)`, z = projector/merger outputs,
     t̄ = mean of the user-question LLM input embeddings (signal `question_embeddings`), positive sign;
3. optional θ weighting (`theta`, disabled by default): `r ← exp(α·r)`, `α = θ/(2(1−θ))`;
4. kernel `L = diag(r)·S·diag(r)`, fast greedy MAP (incremental Cholesky) for the crop's quota; when the
   largest conditional variance left is ≤ max(1e-10, 1e-5 · max diag L) (`exhaustion_threshold`: the
   spec's 1e-10, made relative to the kernel's scale because fp32 rounding leaves ~1e-7 of it) the remaining
   slots are filled by descending r (ties to the lower index). Selection only.

Stage: the stage follows the relevance source: "clip" acts at `vision` (it needs the vision tower's
features), "llm" at `pre_llm`. The default `relevance="auto"` picks the spec's source per model by
capability (the engine tells the method which signals the model provides before `bind`): "clip" where
CLIP `vision_features` exist (LLaVA-1.5/NeXT), "llm" otherwise (Qwen2.5-VL).

The CLIP text tower and `visual_projection` are not part of HF LLaVA checkpoints: `clip_model` (a local path
or an HF id already in the local cache; default `openai/clip-vit-large-patch14-336`, the frozen CLIP of
LLaVA-1.5/NeXT) is loaded once at `vtprune.apply` with `local_files_only=True` (never downloaded); only its
text tower, text projection, vision `post_layernorm` and `visual_projection` are kept, in fp32. If it
cannot be loaded, `apply` raises a `VtpruneError`: pass `clip_model=PATH` or `relevance="llm"` (no silent
fallback). This file imports transformers' CLIP classes for that text encoder only; it knows nothing about
the LVLM. Usage: `vtprune.apply(llava, "cdpruner", 64, clip_model="/models/clip-vit-large-patch14-336")`,
`vtprune.apply(qwen, "cdpruner", 1/9)` (auto → "llm"); offline LLaVA without CLIP: `relevance="llm"`.

Our decisions beyond the spec (also in the report):
- q constant over a crop (max q = min q, e.g. an image whose crop has one token) or no user-question
  tokens with `relevance="llm"`: r ≡ 1 (the kernel is the cosine kernel alone) instead of the reference's
  division by zero;
- LLaVA-NeXT: per vision view (`ImageTokens.view_members`: base view and each CLIP tile's unpadded
  positions), quotas by largest remainder over valid positions, relevance normalised per view;
- `preset="reference"`: same selection on single-crop images (use `positions="reindex"` at
  `vtprune.apply` for the reference's contiguous ids); on multi-crop images it raises, because the
  reference's NeXT behaviour (per-tile picks over padded positions, all newlines kept on top of the
  budget) cannot be expressed by the engine (candidates are valid positions, pre-LLM stages drop newlines).

Cost per crop of n_c tokens and quota K_c: the Gram matrix O(n_c²·D) MACs and n_c² fp32 memory; the greedy
loop Σ_t t·n_c ≈ K_c²·n_c/2 MACs in K_c sequential steps (no host sync inside the loop). "clip" adds
n·(C·P) for the projection and one CLIP text forward per 77-token segment per image.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..budget import largest_remainder_split
from ..errors import VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option

RELEVANCE_SOURCES = ("auto", "clip", "llm")
#: Conditional variance at or below which the kernel is exhausted (spec: fill rule).
EPS_D2 = 1e-10
#: ... or at or below this fraction of the largest diagonal entry of L. Our decision: the spec's 1e-10 is exact
#: arithmetic's zero; in fp32 a rank-deficient kernel leaves the unpicked tokens conditional variances of about
#: 1e-7 of the diagonal (rounding), and greedy picks among those follow the rounding of the machine and of the
#: batched or single loop. Treated as exhausted, the span is filled by relevance, the same everywhere.
RANK_TOL = 1e-5


def exhaustion_threshold(diagonal_max: torch.Tensor) -> torch.Tensor:
    """The conditional variance at or below which a kernel counts as exhausted: max(EPS_D2, RANK_TOL · max diag L).
    diagonal_max: () or (C, 1) -> the same shape."""
    return (diagonal_max.float() * RANK_TOL).clamp(min=EPS_D2)


@dataclass
class CDPrunerConfig(MethodConfig):
    #: "clip" (CLIP text tower, negative cosine; LLaVA families), "llm" (cosine to the mean question
    #: embedding in the LLM input space; Qwen2.5-VL, or LLaVA without a local CLIP model), or "auto" (the
    #: spec's choice per model: "clip" when the model provides CLIP `vision_features`, else "llm").
    relevance: str = option("auto", choices=RELEVANCE_SOURCES)
    #: Local path or HF id (local cache only) of the CLIP model with text tower + projections.
    clip_model: str = option("openai/clip-vit-large-patch14-336")
    #: Relevance weighting θ ∈ (0, 1): r ← exp(θ/(2(1−θ))·r). None = disabled (reference default).
    theta: float | None = option(None, gt=0.0, lt=1.0)


# --------------------------------------------------------------------------------------------- kernel
def minmax_relevance(q: torch.Tensor) -> torch.Tensor:
    """`(q − min q + 1e-6)/(max q − min q)` over one crop of one image; r ≡ 1 when q is constant.  (n,) -> (n,)"""
    q = q.float()
    span = q.max() - q.min()
    if not bool(span > 0):
        return torch.ones_like(q)
    return (q - q.min() + 1e-6) / span


def alpha(theta: float) -> float:
    """α = θ/(2(1−θ)) of the optional relevance weighting (θ = 0.5 → 0.5)."""
    if not 0.0 < theta < 1.0 or math.isnan(theta):
        raise VtpruneError(f"theta must lie in (0, 1), got {theta!r}")
    return theta / (2.0 * (1.0 - theta))


def theta_weight(r: torch.Tensor, theta: float | None) -> torch.Tensor:
    """Optional relevance weighting `exp(α·r)`, `α = θ/(2(1−θ))`; identity when θ is None.  (n,) -> (n,)"""
    if theta is None:
        return r
    return torch.exp(alpha(theta) * r)


def conditional_kernel(feats: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """`L = diag(r)·V̂V̂ᵀ·diag(r)` in fp32.  feats (n, D), r (n,) -> (n, n)."""
    v = F.normalize(feats.float(), dim=1)
    r = r.float()
    return r[:, None] * (v @ v.T) * r[None, :]


def greedy_map(kernel: torch.Tensor, k: int, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fast greedy MAP (incremental Cholesky) with the spec's fill rule.

    kernel (n, n) fp32 PSD, r (n,) relevance (fill order), k ≤ n.
    -> (picks (k,) int64 in pick order, d2 (k,) conditional variance of each greedy pick, t_fill): the
    first `t_fill` picks are greedy; picks[t_fill:] fill the remaining slots by descending r (ties to the
    lower index) once the largest conditional variance left is at or below `exhaustion_threshold` (the spec's
    1e-10, relative to the kernel's scale in fp32); d2[t_fill:] is not meaningful.
    The loop does not synchronise with the device; the exhaustion point is found afterwards.
    """
    n = kernel.shape[0]
    dev = kernel.device
    cis = torch.zeros(k, n, dtype=torch.float32, device=dev)
    d2 = kernel.diagonal().float().clone()
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    picks = torch.empty(k, dtype=torch.long, device=dev)
    gains = torch.empty(k, dtype=torch.float32, device=dev)
    for t in range(k):
        j = d2.masked_fill(taken, float("-inf")).argmax().view(1)  # first maximum: ties to the lower index
        dj = d2.index_select(0, j)  # (1,); 1-element indexing keeps the loop free of host syncs
        picks[t : t + 1] = j
        gains[t : t + 1] = dj
        row = kernel.index_select(0, j).float() - cis[:t].index_select(1, j).T @ cis[:t]  # (1, n)
        e = row / dj.clamp(min=EPS_D2).sqrt()
        cis[t : t + 1] = e
        d2 = d2 - e[0] * e[0]
        taken.index_fill_(0, j, True)
    scale = kernel.diagonal().amax() if n else kernel.new_zeros(())
    bad = (gains <= exhaustion_threshold(scale)) | gains.isnan()
    t_fill = int(bad.int().argmax()) if bool(bad.any()) else k
    if t_fill < k:
        free = torch.ones(n, dtype=torch.bool, device=dev)
        free[picks[:t_fill]] = False
        order = torch.sort(r.float().masked_fill(~free, float("-inf")), descending=True, stable=True).indices
        picks = torch.cat([picks[:t_fill], order[: k - t_fill]])
    return picks, gains, t_fill


def greedy_map_batched(feats: list[torch.Tensor], rs: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """`cdpruner_select` for several crops in one greedy loop (padded to the largest n): per crop c, feats
    (n_c, D), weighted relevance r (n_c,), quota k_c <= n_c -> per crop the sorted kept indices (k_c,)."""
    dev, n_max, bsz = feats[0].device, max(f.shape[0] for f in feats), len(feats)
    kernel = torch.zeros(bsz, n_max, n_max, device=dev)  # (C, N, N), zero padding
    r_pad = torch.zeros(bsz, n_max, device=dev)
    valid = torch.zeros(bsz, n_max, dtype=torch.bool, device=dev)
    for c, (f, r) in enumerate(zip(feats, rs, strict=True)):
        n = f.shape[0]
        kernel[c, :n, :n] = conditional_kernel(f, r)
        r_pad[c, :n] = r.float()
        valid[c, :n] = True
    kmax = max(ks)
    cis = torch.zeros(bsz, kmax, n_max, device=dev)
    d2 = kernel.diagonal(dim1=1, dim2=2).clone()  # (C, N)
    blocked = ~valid
    rows = torch.arange(bsz, device=dev)
    picks = torch.empty(bsz, kmax, dtype=torch.long, device=dev)
    gains = torch.empty(bsz, kmax, device=dev)
    for t in range(kmax):
        j = d2.masked_fill(blocked, float("-inf")).argmax(1)  # (C,) first maximum: ties to the lower index
        dj = d2[rows, j]
        picks[:, t], gains[:, t] = j, dj
        row = kernel[rows, j] - torch.einsum("ct,ctn->cn", cis[rows, :t, j], cis[:, :t])  # (C, N)
        e = row / dj.clamp(min=EPS_D2).sqrt()[:, None]
        cis[:, t] = e
        d2 = d2 - e * e
        blocked[rows, j] = True
    in_k = torch.arange(kmax, device=dev)[None] < torch.tensor(ks, device=dev)[:, None]
    scale = kernel.diagonal(dim1=1, dim2=2).amax(1, keepdim=True) if n_max else r_pad.new_zeros(bsz, 1)  # (C, 1)
    tol = exhaustion_threshold(scale)  # the padding's zeros on the diagonal do not raise the scale
    bad = ((gains <= tol) | gains.isnan()) & in_k
    out = []
    for c, (k, exhausted) in enumerate(zip(ks, bad.any(1).tolist(), strict=True)):
        p = picks[c, :k]
        if exhausted:  # the fill rule where the crop's span was exhausted (rare)
            t_fill = int(bad[c].int().argmax())
            free = valid[c].clone()
            free[p[:t_fill]] = False
            order = torch.sort(r_pad[c].masked_fill(~free, float("-inf")), descending=True, stable=True).indices
            p = torch.cat([p[:t_fill], order[: k - t_fill]])
        out.append(p.sort().values)
    return out


def cdpruner_select(feats: torch.Tensor, r: torch.Tensor, k: int) -> torch.Tensor:
    """One crop: sorted indices of the k kept tokens.  feats (n, D), r (n,) weighted relevance -> (k,)."""
    picks, _, _ = greedy_map(conditional_kernel(feats, r), k, r)
    return picks.sort().values


# ------------------------------------------------------------------------------------------ relevance
def llm_relevance(feats: torch.Tensor, question: torch.Tensor) -> torch.Tensor | None:
    """Raw q = cos(z_i, t̄), t̄ = mean question embedding; None without question tokens.  (n, D), (T, D) -> (n,)"""
    if question.shape[0] == 0:
        return None
    t = question.float().mean(0, keepdim=True)
    return F.cosine_similarity(feats.float(), t, dim=1)


class ClipRelevance(nn.Module):
    """The parts of a `CLIPModel` CDPruner needs: text tower + projection, vision post-LN + projection."""

    def __init__(self, clip: nn.Module, tokenizer):
        super().__init__()
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        self.post_layernorm = clip.vision_model.post_layernorm
        self.visual_projection = clip.visual_projection
        self.tokenizer = tokenizer
        self.segment = int(clip.config.text_config.max_position_embeddings)
        self.vision_width = int(clip.config.vision_config.hidden_size)
        self.float().eval().requires_grad_(False)

    @torch.no_grad()
    def text_embeds(self, text: str, device) -> torch.Tensor:
        """U: the text tokenised once, zero-padded to a multiple of 77, cut into M rows.  -> (M, P) fp32."""
        enc = self.tokenizer(text=text, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        length = ids.shape[1]
        m = (length - 1) // self.segment + 1
        pad = m * self.segment - length
        ids = torch.cat([ids, ids.new_zeros(1, pad)], 1).reshape(m, self.segment).to(device)
        mask = torch.cat([mask, mask.new_zeros(1, pad)], 1).reshape(m, self.segment).to(device)
        pooled = self.text_model(input_ids=ids, attention_mask=mask).pooler_output
        return self.text_projection(pooled).float()

    @torch.no_grad()
    def image_embeds(self, vision_features: torch.Tensor) -> torch.Tensor:
        """E = visual_projection(post_layernorm(F)).  (n, C) -> (n, P) fp32."""
        return self.visual_projection(self.post_layernorm(vision_features.float()))

    def relevance(self, vision_features: torch.Tensor, text: str) -> torch.Tensor:
        """Raw q_i = mean_m(−Ê_i·Û_m).  (n, C) -> (n,)"""
        if vision_features.shape[1] != self.vision_width:
            raise VtpruneError(
                f"cdpruner: the vision features have width {vision_features.shape[1]} but the CLIP model's vision "
                f"width is {self.vision_width}; pass the CLIP model the LVLM was built on (clip_model=PATH) or "
                "relevance='llm'"
            )
        dev = vision_features.device
        self.to(dev)
        e = F.normalize(self.image_embeds(vision_features), dim=1)
        u = F.normalize(self.text_embeds(text, dev), dim=1)
        return (-(e @ u.T)).mean(1)


@lru_cache(maxsize=2)
def load_clip_relevance(path: str) -> ClipRelevance:
    """Load `CLIPModel` + its tokenizer from a local path / the local HF cache (no download)."""
    try:
        from transformers import CLIPModel, CLIPTokenizerFast

        clip = CLIPModel.from_pretrained(path, local_files_only=True)
        tokenizer = CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise VtpruneError(
            f"cdpruner relevance='clip' needs a CLIP model with text tower and projections (same CLIP as the "
            f"LVLM's vision tower); none could be loaded offline from {path!r} ({type(err).__name__}: {err}). "
            "Pass vtprune.apply(..., clip_model=PATH) with a local copy of openai/clip-vit-large-patch14-336, "
            "or relevance='llm' (question embeddings in the LLM input space)"
        ) from err
    return ClipRelevance(clip, tokenizer)


# ------------------------------------------------------------------------------------------------ method
@register
class CDPruner(PruningMethod):
    """Conditional DPP (relevance-weighted cosine kernel), fast greedy MAP per crop, before the LLM."""

    name = "cdpruner"
    config_class = CDPrunerConfig
    #: "reference": single-crop images as the default (reindexed ids are `positions="reindex"`); refuses
    #: multi-crop (LLaVA-NeXT) images, whose reference behaviour the engine cannot express.
    presets = ("default", "reference")

    def __init__(self, config: CDPrunerConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.relevance not in RELEVANCE_SOURCES:
            raise VtpruneError(f"cdpruner relevance must be one of {RELEVANCE_SOURCES}, got {c.relevance!r}")
        if c.theta is not None:
            if isinstance(c.theta, bool) or not isinstance(c.theta, (int, float)):
                raise VtpruneError(f"cdpruner theta must be a number in (0, 1) or None, got {c.theta!r}")
            alpha(c.theta)
        if isinstance(c.clip_model, os.PathLike):
            c.clip_model = os.fspath(c.clip_model)
        if c.relevance in ("clip", "auto") and not (isinstance(c.clip_model, str) and c.clip_model):
            raise VtpruneError(f"cdpruner clip_model must be a path or HF id, got {c.clip_model!r}")
        self._clip: ClipRelevance | None = None
        #: the relevance source in use ("auto" is resolved by `bind`; "clip" before, as on LLaVA)
        self.relevance = "clip" if c.relevance == "auto" else c.relevance

    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        if self.config.relevance == "auto" and self.available_signals is not None:
            self.relevance = "clip" if "vision_features" in self.available_signals else "llm"
        if self.relevance == "clip":
            _ = self.clip  # fail at apply time when the CLIP model cannot be loaded

    @property
    def clip(self) -> ClipRelevance:
        if self._clip is None:
            self._clip = load_clip_relevance(self.config.clip_model)
        return self._clip

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("vision") if self.relevance == "clip" else Stage("pre_llm"),)

    def signals(self, stage_index: int) -> frozenset[str]:
        if self.relevance == "clip":
            return frozenset({"vision_features", "question_text"})
        return frozenset({"question_embeddings"})

    def raw_relevance(self, image: ImageTokens) -> torch.Tensor | None:
        """q (n,) before normalisation, or None when there is nothing to be relevant to (r ≡ 1)."""
        if self.relevance == "llm":
            return llm_relevance(image.features, image.signals["question_embeddings"])
        if image.question is None:
            raise VtpruneError("cdpruner relevance='clip' got no question text (signal 'question_text')")
        return self.clip.relevance(image.signals["vision_features"], image.question)

    #: the batched loop on CPU too (tests); by default only accelerators batch (per-crop loops launch-bound)
    batch_on_cpu: bool = False

    def _crops(self, image: ImageTokens, k: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per vision view with a non-zero quota: (candidate indices, weighted relevance r, quota)."""
        if self.config.preset == "reference" and len(image.grids) > 1:
            raise VtpruneError(
                "cdpruner preset='reference' cannot reproduce the reference's multi-crop (LLaVA-NeXT) behaviour "
                "(per-tile picks over padded positions, every newline kept on top of the budget): vtprune's "
                "candidates are valid positions only and pre-LLM stages drop newlines; use preset='default'"
            )
        q = self.raw_relevance(image)
        members = image.view_members()  # per vision view: LLaVA-NeXT base view and each tile
        quotas = largest_remainder_split(k, [len(m) for m in members])
        crops = []
        for idx, quota in zip(members, quotas, strict=True):
            if quota == 0:
                continue
            r = minmax_relevance(q[idx]) if q is not None else torch.ones(len(idx), device=idx.device)
            crops.append((idx, theta_weight(r, self.config.theta), quota))
        return crops

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        with torch.no_grad():
            keep = [idx[cdpruner_select(image.features[idx], r, quota)] for idx, r, quota in self._crops(image, k)]
            return KeepPlan(torch.cat(keep).sort().values)

    def select_batch(self, stage_index: int, images: list[ImageTokens], ks: list[int]) -> list[KeepPlan]:
        """Every crop of every image in one greedy loop on accelerators (`greedy_map_batched`)."""
        if len(images) < 2 or (images[0].features.device.type == "cpu" and not self.batch_on_cpu):
            return super().select_batch(stage_index, images, ks)
        with torch.no_grad():
            crops = [(b, idx, r, quota) for b, (im, k) in enumerate(zip(images, ks, strict=True))
                     for idx, r, quota in self._crops(im, k)]  # fmt: skip
            kept = greedy_map_batched([images[b].features[idx] for b, idx, _, _ in crops], [c[2] for c in crops],
                                      [c[3] for c in crops])  # fmt: skip
            per_image: list[list[torch.Tensor]] = [[] for _ in images]
            for (b, idx, _, _), sel in zip(crops, kept, strict=True):
                per_image[b].append(idx[sel])
            return [KeepPlan(torch.cat(keep).sort().values) for keep in per_image]
