"""Wall-clock measurement of prefill: warm-up, device synchronisation, interleaved rounds, min and median.

On a shared CPU host interleaving the cases per round and reporting the minimum is the robust choice
(see notes: 2-thread medians were off by up to 3×); on GPU, CUDA events time the device work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Milliseconds of one case over several rounds."""

    samples_ms: list[float]

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(
    cases: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, Timing]:
    """Run every case once per round, in turn, after `warmup` untimed rounds.  -> Timing per case."""
    device = torch.device(device)
    out = {name: Timing([]) for name in cases}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for name, fn in cases.items():
                ms = _timed(fn, device)
                if r >= warmup:
                    out[name].samples_ms.append(ms)
    return out
