"""`pool`: 2-D average (or max) pooling of each grid of visual tokens in LLM space (spec baselines.md).

Pooled cells are merged tokens; each names the source token at the floor of its cell centre as its
representative (order and position id). The realised count h'·w' can differ from K and is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import largest_remainder_split
from ..errors import VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option


@dataclass
class PoolConfig(MethodConfig):
    #: "avg" (default) or "max".
    mode: str = option("avg", choices=("avg", "max"))
    #: Pick the factor pair of K closest in aspect to the grid, so exactly K cells come out.
    exact: bool = option(False)


def pooled_shape(h: int, w: int, k: int, exact: bool = False) -> tuple[int, int]:
    """Output grid (h', w') for K cells on an h×w grid.

    Default: `h' = clamp(round(sqrt(K·h/w)), 1, h)`, `w' = clamp(round(K/h'), 1, w)`.
    exact: the factor pair of K (within the grid) whose aspect is closest to h/w in log-ratio,
    ties to h' ≥ w'.
    """
    if exact:
        pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= h and k // a <= w]
        if pairs:
            target = math.log(h / w)
            return min(pairs, key=lambda p: (abs(math.log(p[0] / p[1]) - target), -p[0]))
    hp = min(max(round(math.sqrt(k * h / w)), 1), h)
    wp = min(max(round(k / hp), 1), w)
    return hp, wp


def cell_bounds(size: int, cells: int) -> list[tuple[int, int]]:
    """PyTorch adaptive-pooling cell boundaries: cell i covers [floor(i·s/c), ceil((i+1)·s/c))."""
    return [(i * size // cells, -(-(i + 1) * size // cells)) for i in range(cells)]


def pool_grid(feats: torch.Tensor, h: int, w: int, hp: int, wp: int, mode: str = "avg"):
    """Pool a raster grid of tokens.  feats (h·w, D) -> (pooled (h'·w', D), representatives (h'·w',))."""
    x = feats.float().reshape(1, h, w, -1).permute(0, 3, 1, 2)  # (1, D, h, w) channels-last view: ~10× faster
    pooled = F.adaptive_avg_pool2d(x, (hp, wp)) if mode == "avg" else F.adaptive_max_pool2d(x, (hp, wp))
    pooled = pooled.reshape(-1, hp * wp).T.to(feats.dtype)
    rows = [(a + b - 1) // 2 for a, b in cell_bounds(h, hp)]
    cols = [(a + b - 1) // 2 for a, b in cell_bounds(w, wp)]
    reps = torch.tensor([r * w + c for r in rows for c in cols], dtype=torch.long, device=feats.device)
    return pooled, reps


@register(aliases=("pool2d",))
class Pool2D(PruningMethod):
    """Adaptive 2-D pooling of the projector outputs, per grid, before the LLM."""

    name = "pool"
    config_class = PoolConfig
    merges = True
    exact_count = False

    def __init__(self, config: PoolConfig | None = None):
        super().__init__(config)
        if self.config.mode not in ("avg", "max"):
            raise VtpruneError(f"pool mode must be 'avg' or 'max', got {self.config.mode!r}")

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("pre_llm"),)

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        sizes = [h * w for h, w in image.grids]
        if image.n != sum(sizes):
            raise VtpruneError("pool needs every token of the image's grids (it must be the first stage)")
        quotas = largest_remainder_split(k, sizes)
        keep, feats, weights = [], [], []
        offset = 0
        for (h, w), q in zip(image.grids, quotas, strict=True):
            hp, wp = pooled_shape(h, w, q, self.config.exact)
            pooled, reps = pool_grid(image.features[offset : offset + h * w], h, w, hp, wp, self.config.mode)
            keep.append(reps + offset)
            feats.append(pooled)
            cells_h = [b - a for a, b in cell_bounds(h, hp)]
            cells_w = [b - a for a, b in cell_bounds(w, wp)]
            weights.append(torch.tensor([a * b for a in cells_h for b in cells_w], dtype=torch.float32))
            offset += h * w
        keep_idx = torch.cat(keep)
        order = keep_idx.argsort()
        return KeepPlan(keep_idx[order], torch.cat(feats)[order], torch.cat(weights)[order.cpu()])
