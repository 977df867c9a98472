"""RCP training schedules (spec rcp.md §E), as pure functions of the optimiser step t of T.

- Gumbel: fraction f = t/T; f < 0.6: τ linear 1.5 → 0.2, noise on; 0.6 ≤ f < 0.8: τ = 0.2, noise on;
  f ≥ 0.8: τ = 0.2, noise off.
- Sparsity target r*: cosine-annealed from 1 to ρ over the first 10 % of the steps, then ρ.
- Learning rate: linear warm-up over the first 10 % of the steps (from lr/W at t = 0 to lr), then cosine
  from lr to the floor 0.1·lr at the last step.
- β's learning rate (deviation, issue 22; `train.param_groups`): the same warm-up, then constant (`beta_lr_factor`),
  so the logit offset can still follow the budget in the last 20 % of the steps, when the noise is off.
"""

from __future__ import annotations

import math


def gumbel_schedule(
    step: int,
    total: int,
    tau_start: float = 1.5,
    tau_end: float = 0.2,
    anneal_until: float = 0.6,
    noise_until: float = 0.8,
) -> tuple[float, bool]:
    """(τ, noise_on) at optimiser step `step` of `total`."""
    f = step / max(total, 1)
    if f < anneal_until:
        return tau_start + (tau_end - tau_start) * f / anneal_until, True
    return tau_end, f < noise_until


def sparsity_target(step: int, total: int, rho: float, warm: float = 0.1) -> float:
    """r*: 1 → ρ by a half cosine over the first `warm` fraction of the steps, then ρ."""
    w = warm * max(total, 1)
    if step >= w or w <= 0:
        return rho
    return rho + (1.0 - rho) * 0.5 * (1.0 + math.cos(math.pi * step / w))


def lr_factor(step: int, total: int, warmup: float = 0.1, floor: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based) of `total`."""
    total = max(total, 1)
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    span = max(total - w - 1, 1)
    progress = min((step - w) / span, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def beta_lr_factor(step: int, total: int, warmup: float = 0.1) -> float:
    """Multiplier of β's learning rate: `lr_factor`'s linear warm-up, then 1."""
    w = max(1, int(round(warmup * max(total, 1))))
    return (step + 1) / w if step < w else 1.0
