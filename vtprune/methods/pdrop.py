"""PyramidDrop (CVPR 2025), inference-only: at each of three stage boundaries keep the visual tokens the last
prompt token attends to most, a fraction λ of the previous stage's (spec pdrop.md).

At stage `llm:b_s` the engine's `layer_last_token_attention` (n,) — layer b_s's own attention row of the last
prompt token, recomputed from the hidden states entering layer b_s (head mean, no eager attention) — ranks
the image's current candidates; the top k_s are kept (stable ties). Each stage selects among the survivors of
the previous one, so the selection is nested. Selection only.

Schedules (`schedule=`):
- "budget" (default, Our decision of the spec): boundaries `b_1 = 2`, `b_2 = round_half_up(10·L/32)`,
  `b_3 = round_half_up(20·L/32)` (2/10/20 on 32 layers, 2/9/18 on 28; bumped to stay strictly increasing on
  shallow models: 2/3/4 on 6), `k_1 = round_half_up((L·B − b_1·N) / ((b_2−b_1) + λ(b_3−b_2) + λ²(L−b_3)))`,
  `k_2 = ⌊λ·k_1⌋`, `k_3 = ⌊λ²·k_1⌋` (λ = `lam` = 0.5: 312/156/78 for B = 192 on LLaVA-1.5, n̄ = 192.0);
  `BudgetError` when k_3 < 1 (k_1 < 4 at λ = 0.5) or k_1 > N, naming the feasible budget range. In
  `budget_mode="retained"` the budget is the count after the first cut (FastV's convention): k_1 = B.
- "paper": boundaries `round_half_up((8, 16, 24)·L/32)`, `k_s = int(N·λ^s)` (576 → 288 → 144 → 72, n̄ = 270);
  the budget value is not used (a budget ≥ N still bypasses).
`preset="reference"` defaults `schedule` to "paper" (the reference's setting); use `positions="reindex"` for the
reference's contiguous ids.

Extra compute (no layer is switched to eager; SDPA/FA kernels run unchanged): per boundary, layer b's input
norm and one query row, D·H·d_h MACs, its keys for the T current rows recomputed (the layer has not run
yet), T·D·H_kv·d_h MACs (≈ 1.3·10⁸ for T = 640 on LLaVA-7B), and the scores, T·H·d_h; then a sort of n_v
scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BudgetError, VtpruneError
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option, stable_topk

REF_LAYERS = 32
#: Boundaries on 32 layers: the budget schedule (Our decision; b_1 = 2 fixed) and the paper's.
BUDGET_BOUNDARIES = (2, 10, 20)
PAPER_BOUNDARIES = (8, 16, 24)
SCHEDULES = ("budget", "paper")


@dataclass
class PDropConfig(MethodConfig):
    #: "budget" (k_1 solved from the budget) or "paper" (k_s = int(N·λ^s)); None: "budget", or "paper" under
    #: preset="reference".
    schedule: str | None = option(None, choices=SCHEDULES)
    #: λ, the fraction of the previous stage's tokens kept at each boundary.
    lam: float = option(0.5, gt=0.0, le=1.0)


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def boundaries(schedule: str, num_layers: int) -> tuple[int, int, int]:
    """Stage layers b_1 < b_2 < b_3 for a model with `num_layers` decoder layers."""
    if schedule == "budget":
        raw = [2] + [round_half_up(b * num_layers / REF_LAYERS) for b in BUDGET_BOUNDARIES[1:]]
    else:
        raw = [max(1, round_half_up(b * num_layers / REF_LAYERS)) for b in PAPER_BOUNDARIES]
    out: list[int] = []
    for b in raw:
        out.append(max(b, out[-1] + 1) if out else b)
    return tuple(out)  # type: ignore[return-value]


def budget_first_count(n: int, budget: int, bounds, num_layers: int, lam: float = 0.5) -> int:
    """k_1 of the budget schedule so that n̄ = B: `round_half_up((L·B − b_1·N) / Σ_s λ^(s−1)·(b_{s+1} − b_s))`."""
    b1, b2, b3 = bounds
    weight = (b2 - b1) + lam * (b3 - b2) + lam**2 * (num_layers - b3)
    return round_half_up((num_layers * budget - b1 * n) / weight)


def later_counts(k1: int, lam: float) -> list[int]:
    """[k_1, ⌊λ·k_1⌋, ⌊λ²·k_1⌋]."""
    return [k1, math.floor(k1 * lam), math.floor(k1 * lam**2)]


def layer_average(n: int, counts, bounds, num_layers: int) -> float:
    """n̄ (input convention): N before b_1, k_s from b_s to b_{s+1} − 1."""
    edges = [0, *bounds, num_layers]
    sizes = [n, *counts]
    return sum((edges[i + 1] - edges[i]) * sizes[i] for i in range(len(sizes))) / num_layers


@register
class PDrop(PruningMethod):
    """Three-stage pyramid: keep ⌊λ·⌋ of the survivors by last-token attention at each boundary."""

    name = "pdrop"
    config_class = PDropConfig
    #: "reference": the paper schedule by default; the reference's contiguous ids are `positions="reindex"`.
    presets = ("default", "reference")

    def __init__(self, config: PDropConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.schedule is not None and c.schedule not in SCHEDULES:
            raise VtpruneError(f"pdrop schedule must be one of {SCHEDULES}, got {c.schedule!r}")
        if isinstance(c.lam, bool) or not isinstance(c.lam, (int, float)) or not 0.0 < c.lam <= 1.0:
            raise VtpruneError(f"pdrop lam (λ) must lie in (0, 1], got {c.lam!r}")

    @property
    def schedule_name(self) -> str:
        if self.config.schedule is not None:
            return self.config.schedule
        return "paper" if self.config.preset == "reference" else "budget"

    def boundaries(self, num_layers: int | None = None) -> tuple[int, int, int]:
        return boundaries(self.schedule_name, num_layers or self.num_layers or REF_LAYERS)

    def stages(self) -> tuple[Stage, ...]:
        return tuple(Stage("llm", b) for b in self.boundaries())

    def validate(self, num_layers: int) -> None:
        if self.boundaries(num_layers)[-1] >= num_layers:
            raise VtpruneError(
                f"pdrop needs three distinct stage boundaries inside the model; with {num_layers} decoder layers "
                f"the {self.schedule_name!r} schedule gives {self.boundaries(num_layers)} (use a deeper model)"
            )
        super().validate(num_layers)

    def signals(self, stage_index: int) -> frozenset[str]:
        return frozenset({"layer_last_token_attention"})

    def schedule(self, n: int, budget: int, mode: str, num_layers: int) -> list[int]:
        lam = float(self.config.lam)
        if budget >= n:
            return [n] * 3
        if self.schedule_name == "paper":
            return [max(1, min(n, int(n * lam**s))) for s in (1, 2, 3)]
        bounds = self.boundaries(num_layers)
        k1 = budget if mode == "retained" else budget_first_count(n, budget, bounds, num_layers, lam)
        counts = later_counts(k1, lam)
        if counts[-1] >= 1 and k1 <= n:
            return counts
        raise self._infeasible(n, budget, mode, bounds, num_layers, lam, k1)

    @staticmethod
    def _infeasible(n, budget, mode, bounds, num_layers, lam, k1) -> BudgetError:
        k_min = next(k for k in range(1, 10**9) if math.floor(k * lam**2) >= 1)
        if mode == "retained":
            return BudgetError(
                f"pdrop schedule='budget' (retained): k_1 = {budget} leaves ⌊λ²·k_1⌋ = 0 tokens at the last stage; "
                f"the smallest feasible budget is {k_min}"
            )

        def first(b: int) -> int:
            return budget_first_count(n, b, bounds, num_layers, lam)

        lo = next((b for b in range(1, n) if later_counts(first(b), lam)[-1] >= 1), n)
        hi = max((b for b in range(lo, n) if first(b) <= n), default=lo - 1)
        why = f"k_1 = {k1} > N = {n}" if k1 > n else f"k_1 = {k1}, which leaves ⌊λ²·k_1⌋ < 1 token at the last stage"
        return BudgetError(
            f"pdrop schedule='budget' (boundaries {'/'.join(map(str, bounds))} of {num_layers}, λ = {lam:g}): a "
            f"layer-averaged budget of {budget} for {n} visual tokens gives {why}; feasible budgets are "
            f"{lo}..{hi} (and ≥ {n}: no pruning); schedule='paper' keeps fixed fractions λ^s of N"
        )

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        return KeepPlan(stable_topk(image.signals["layer_last_token_attention"], k))
