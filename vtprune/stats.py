"""Confidence intervals for accuracies (a proportion k/n of correct answers)."""

from __future__ import annotations

import math

from vtprune.errors import VtpruneError

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: k successes of n trials -> (low, high) in [0, 1].

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at k = 0 or k = n
    (e.g. 50/50 -> (0.929, 1.0)). n = 0 gives (0.0, 1.0): nothing is known.
    """
    if n < 0 or not 0 <= k <= n:
        raise VtpruneError(f"wilson: need 0 <= k <= n and n >= 0, got k={k!r}, n={n!r}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else min(lo, p)), (1.0 if k == n else max(hi, p))


def accuracy_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """`wilson` from an accuracy and its sample count (k = round(accuracy · n))."""
    return wilson(round(accuracy * n), n, z)
