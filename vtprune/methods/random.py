"""`random`: K visual tokens drawn uniformly without replacement (spec baselines.md).

Seeded from (global seed, sample), so the same sample gets the same set whatever batch it is in.
Multi-crop images get per-crop quotas (largest remainder), then uniform sampling inside each crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import largest_remainder_split
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option


@dataclass
class RandomConfig(MethodConfig):
    seed: int = option(0)
    #: None: pre-LLM; an int k: draw at the input of decoder layer k (FastV's random-mask path).
    layer: int | None = option(None, ge=1)


@register
class RandomPruning(PruningMethod):
    """Uniform random selection, pre-LLM (default) or at `llm:layer`."""

    name = "random"
    config_class = RandomConfig

    def stages(self) -> tuple[Stage, ...]:
        layer = self.config.layer
        return (Stage("pre_llm"),) if layer is None else (Stage("llm", layer),)

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        gen = torch.Generator().manual_seed((self.config.seed * 1_000_003 + image.seed) % (2**63))
        crop = image.crop.cpu()
        crops = torch.unique(crop).tolist()
        sizes = [int((crop == c).sum()) for c in crops]
        quotas = largest_remainder_split(k, sizes)
        chosen = []
        for c, q in zip(crops, quotas, strict=True):
            members = (crop == c).nonzero().flatten()
            chosen.append(members[torch.randperm(len(members), generator=gen)[:q]])
        keep = torch.cat(chosen).sort().values
        return KeepPlan(keep.to(image.features.device))
