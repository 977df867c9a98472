"""FastV (ECCV 2024): rank visual tokens by the attention they receive at layer K−1, cut at `llm:K`.

Spec: fastv.md. Default criterion is the official code's: the attention row of the last prompt token,
averaged over heads. `criterion="mean_received"` is the paper text's variant. The engine recomputes
the needed rows from layer K−1's input and cache (no eager attention): one query row costs
O(H·d_h·T) per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, one_cut_keep, option, stable_topk

CRITERIA = {"last_token": "last_token_attention", "mean_received": "mean_received_attention"}


@dataclass
class FastVConfig(MethodConfig):
    #: Cut at the input of decoder layer k (scores from layer k−1).
    k: int = option(2, ge=1)
    #: "last_token" (official code) or "mean_received" (paper text).
    criterion: str = option("last_token", choices=tuple(CRITERIA))
    #: Paper notation: drop ratio r, R = round(N·(1 − r)); overrides the budget mapping when set.
    r: float | None = option(None, ge=0.0, lt=1.0)


@register
class FastV(PruningMethod):
    """One cut at `llm:k`, keeping the R visual tokens with the highest attention at layer k−1."""

    name = "fastv"
    config_class = FastVConfig
    presets = ("default", "reference")

    def __init__(self, config: FastVConfig | None = None):
        super().__init__(config)
        if self.config.criterion not in CRITERIA:
            raise VtpruneError(f"fastv criterion must be one of {list(CRITERIA)}, got {self.config.criterion!r}")
        if self.config.r is not None and not 0.0 <= self.config.r < 1.0:
            raise VtpruneError(f"fastv drop ratio r must lie in [0, 1), got {self.config.r!r}")

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("llm", self.config.k),)

    def signals(self, stage_index: int) -> frozenset[str]:
        return frozenset({CRITERIA[self.config.criterion]})

    def schedule(self, n: int, budget: int, mode: str, num_layers: int) -> list[int]:
        if self.config.r is not None:
            return [max(1, math.floor(n * (1.0 - self.config.r) + 0.5))]
        if mode == "retained":
            return [min(budget, n)]
        return [one_cut_keep(n, budget, self.config.k, num_layers)]

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        scores = image.signals[CRITERIA[self.config.criterion]]
        return KeepPlan(stable_topk(scores, k))
