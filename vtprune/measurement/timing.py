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


class PrefillTimer:
    """Times every prefill (sequence length > 1) of a module, e.g. the language model inside `generate`.

    with PrefillTimer(model.model.language_model) as timer:
        model.generate(...)
    timer.ms  # one entry per prefill call
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.ms: list[float] = []
        self._t0 = 0.0
        self._handles: list = []

    def _pre(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds", args[0] if args else None)
        if x is None:
            x = kwargs.get("input_ids")
        self._active = x is not None and x.shape[1] > 1
        if self._active:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            self._t0 = time.perf_counter()
            self._device = x.device

    def _post(self, module, args, kwargs, output):
        if self._active:
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            self.ms.append((time.perf_counter() - self._t0) * 1e3)

    def __enter__(self) -> PrefillTimer:
        self._active = False
        self._handles = [
            self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.module.register_forward_hook(self._post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
