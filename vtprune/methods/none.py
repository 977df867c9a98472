"""`none`: no pruning. The engine still records N, n̄ = N, FLOPs and KV bytes (spec baselines.md)."""

from __future__ import annotations

from . import register
from .base import ImageTokens, KeepPlan, PruningMethod, Stage


@register
class NoPruning(PruningMethod):
    """Identity: the model runs exactly as stock."""

    name = "none"

    def stages(self) -> tuple[Stage, ...]:
        return ()

    def schedule(self, n: int, budget: int, mode: str, num_layers: int) -> list[int]:
        return []

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:  # pragma: no cover
        raise AssertionError("'none' has no stages")
