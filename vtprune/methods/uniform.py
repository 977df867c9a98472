"""`uniform`: K visual tokens on a regular 2-D lattice over each grid (spec baselines.md, Our decision).

Per grid h×w with quota K (multi-crop: per-crop quotas by largest remainder, README §8):
`g_h = clamp(round(sqrt(K·h/w)), 1, h)`, `g_w = clamp(ceil(K/g_h), 1, w)` (then `g_h` grown if the
lattice is still short), lattice rows/cols at the floor of the cell centres, and the M − K surplus
raster points `floor((j + 0.5)·M/(M − K))` dropped. Deterministic, content-free; cost O(K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import largest_remainder_split
from ..errors import VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage


@dataclass
class UniformConfig(MethodConfig):
    pass


def lattice_shape(h: int, w: int, k: int) -> tuple[int, int]:
    """(g_h, g_w) of the lattice for K points on an h×w grid; g_h·g_w ≥ K whenever K ≤ h·w."""
    gh = min(max(math.floor(math.sqrt(k * h / w) + 0.5), 1), h)
    gw = min(max(math.ceil(k / gh), 1), w)
    if gh * gw < k:
        gh = min(max(math.ceil(k / gw), 1), h)
    return gh, gw


def uniform_lattice(h: int, w: int, k: int) -> torch.Tensor:
    """Sorted raster indices (r·w + c) of the K lattice points on an h×w grid.  -> (K,) int64."""
    if k >= h * w:
        return torch.arange(h * w)
    gh, gw = lattice_shape(h, w, k)
    rows = (torch.arange(gh, dtype=torch.float64) + 0.5).mul(h / gh).floor().long()
    cols = (torch.arange(gw, dtype=torch.float64) + 0.5).mul(w / gw).floor().long()
    points = (rows[:, None] * w + cols[None, :]).flatten()  # raster order, M = g_h·g_w ≥ K
    m = points.numel()
    if m > k:
        drop = torch.tensor([math.floor((j + 0.5) * m / (m - k)) for j in range(m - k)], dtype=torch.long)
        keep = torch.ones(m, dtype=torch.bool)
        keep[drop] = False
        points = points[keep]
    return points.sort().values


@register
class Uniform(PruningMethod):
    """Regular lattice of K tokens per grid, before the LLM (no features, no signals)."""

    name = "uniform"
    config_class = UniformConfig

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("pre_llm"),)

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        crop, coords = image.crop.cpu(), image.coords.cpu()
        members = [(crop == c).nonzero().flatten() for c in range(len(image.grids))]
        quotas = largest_remainder_split(k, [len(m) for m in members])
        chosen = []
        for (h, w), idx, q in zip(image.grids, members, quotas, strict=True):
            if q == 0:
                continue
            if len(idx) != h * w:
                raise VtpruneError("uniform needs every position of each grid (it must be the first stage)")
            table = torch.empty(h * w, dtype=torch.long)
            table[coords[idx, 0] * w + coords[idx, 1]] = idx  # raster position -> candidate index
            chosen.append(table[uniform_lattice(h, w, q)])
        keep = torch.cat(chosen).sort().values
        return KeepPlan(keep.to(image.features.device))
