"""Budget semantics (spec README §4): a token count or a ratio, in `layer_avg` or `retained` mode."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .errors import BudgetError

BudgetMode = Literal["layer_avg", "retained"]
BUDGET_MODES: tuple[str, ...] = ("layer_avg", "retained")


@dataclass(frozen=True)
class Budget:
    """A requested visual-token budget.

    `value` is an int (tokens per sample) or a float in (0, 1) (ratio of the sample's visual tokens).
    `mode` says whether the count means tokens entering layer 0 (`retained`) or the layer average n̄.
    """

    value: int | float
    mode: BudgetMode = "layer_avg"

    @classmethod
    def parse(cls, value: object, mode: object = "layer_avg") -> Budget:
        """Validate user input; raise `BudgetError` naming the problem.

        The one rule: an int (Python or numpy integer) >= 1 is a token count; a float (Python or numpy) must lie
        in (0, 1) and is a ratio. A float >= 1 (e.g. `64.0`, `1.0`) is refused: pass an int for a token count.
        """
        if isinstance(value, Budget):
            return value
        if mode not in BUDGET_MODES:
            raise BudgetError(f"budget_mode must be one of {BUDGET_MODES}, got {mode!r}")
        value = _plain_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BudgetError(
                f"budget must be an int (tokens) or a float in (0, 1) (ratio), got {type(value).__name__} {value!r}"
            )
        if isinstance(value, float):
            if math.isnan(value) or math.isinf(value):
                raise BudgetError(f"budget must be a finite number, got {value!r}")
            if value >= 1.0:
                hint = f"; for {int(value)} tokens pass the int {int(value)}" if value.is_integer() else ""
                raise BudgetError(
                    f"a float budget is a ratio and must lie in (0, 1), got {value!r}{hint} "
                    "(an int budget is a token count)"
                )
            if not value > 0.0:
                raise BudgetError(f"a ratio budget must lie in (0, 1), got {value!r}")
        if isinstance(value, int) and value <= 0:
            raise BudgetError(f"a token budget must be a positive int, got {value!r}")
        return cls(value=value, mode=mode)  # type: ignore[arg-type]

    @classmethod
    def from_text(cls, text: str, mode: object = "layer_avg") -> Budget:
        """A command-line budget: "64" -> 64 tokens, "0.25" or "1/9" -> a ratio; then `parse`."""
        t = str(text).strip()
        try:
            if "/" in t:
                num, den = t.split("/", 1)
                value: int | float = float(num) / float(den)
            elif t.lstrip("+").isdigit():
                value = int(t)
            else:
                value = float(t)
        except (ValueError, ZeroDivisionError):
            raise BudgetError(
                f"budget must be an int (tokens, e.g. 64) or a ratio in (0, 1) (e.g. 0.25 or 1/9), got {text!r}"
            ) from None
        return cls.parse(value, mode)

    @property
    def is_ratio(self) -> bool:
        return isinstance(self.value, float)

    def tokens_for(self, n_visual: int) -> int:
        """Budget in tokens for a sample with `n_visual` visual tokens: `K = max(1, floor(ρ·N + 0.5))`."""
        if self.is_ratio:
            return max(1, math.floor(self.value * n_visual + 0.5))
        return int(self.value)

    def __str__(self) -> str:
        return f"{self.value} ({self.mode})"


def _plain_number(value: object) -> object:
    """numpy integer / floating scalars (and 0-d arrays) -> Python int / float; anything else unchanged."""
    if type(value).__module__ == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value[()]
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return float(value)
    return value


def image_budgets(total: int, sizes: list[int], sample: int = 0) -> list[int]:
    """A sample's token budget split over its images (`largest_remainder_split`, spec README §10), each image
    keeping at least one token; raises `BudgetError` when the budget is smaller than the number of images."""
    n_images = sum(1 for s in sizes if s > 0)
    if total < min(n_images, sum(sizes)):
        raise BudgetError(
            f"a budget of {total} token(s) cannot keep one token of each of the {n_images} images of sample {sample}; "
            f"pass a budget of at least {n_images} (one token per image) or a ratio"
        )
    return largest_remainder_split(total, sizes)


def largest_remainder_split(total: int, sizes: list[int], minimum: int = 1) -> list[int]:
    """Split `total` over parts in proportion to `sizes` (largest remainder, ties to the earlier part).

    Each part gets at least `min(minimum, size)` and at most its size (spec README §8, §10).
    """
    if not sizes:
        return []
    n = sum(sizes)
    if total >= n:
        return list(sizes)
    if total < sum(1 for s in sizes if s > 0):  # too few tokens to give every part one: no minimum
        minimum = 0
    raw = [total * s / n for s in sizes]
    parts = [math.floor(r) for r in raw]
    left = total - sum(parts)
    order = sorted(range(len(sizes)), key=lambda i: (-(raw[i] - parts[i]), i))
    for i in order[:left]:
        parts[i] += 1
    parts = [min(max(p, min(minimum, s)), s) for p, s in zip(parts, sizes, strict=True)]
    # Clamping can break the total; move the excess/deficit over the parts in the same order.
    diff = total - sum(parts)
    for i in order * 2:
        if diff == 0:
            break
        if diff > 0 and parts[i] < sizes[i]:
            parts[i] += 1
            diff -= 1
        elif diff < 0 and parts[i] > min(minimum, sizes[i]):
            parts[i] -= 1
            diff += 1
    return parts
