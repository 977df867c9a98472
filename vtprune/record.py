"""What `vtprune.last_run(model)` returns: per-sample pruning events, token counts, FLOPs and KV bytes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .measurement.flops import LLMDims, kv_cache_bytes, prefill_flops_all


@dataclass
class PruningEvent:
    """One pruning event of one sample.

    keep_idx: (K,) int64, sorted, indices into the sample's original visual tokens (all its images,
    in prompt order); merged tokens are named by their representative.
    """

    stage: str
    keep_idx: torch.Tensor
    merged: bool = False
    #: tokens inserted before the LLM (e.g. VisionZip's [CLS]) per image of the sample, up to this event;
    #: they are no candidates, so `keep_idx` never names them.
    inserted: list[int] = field(default_factory=list)
    #: (M,) int64 sorted: the kept indices (as `keep_idx`) whose features are merges, i.e. a plan's `new_feats` row
    #: differed from the candidate's own features at this event or an earlier one.
    merged_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


@dataclass
class SelectCall:
    """One `method.select` call of a prefill: the sample, the image (its index in the sample), the stage index and
    the call's time (`ms`; CUDA events are read, with one synchronisation, on first access)."""

    stage: int
    sample: int = -1
    image: int = -1
    #: this image's share of the call's time: 1 for a per-image call, 1/B when B images were selected in one
    #: `select_batch` call (its time split evenly, so the sum over the images is the call's time)
    share: float = 1.0
    _ms: float | None = None
    _events: tuple | None = None

    @classmethod
    def start(cls, stage: int, device: torch.device) -> SelectCall:
        call = cls(stage)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call._events = (begin, end)
        else:
            call._ms = -time.perf_counter()
        return call

    def split(self, parts: int) -> list[SelectCall]:
        """The call of a batch of `parts` images, as one record per image with an even share of its time."""
        return [SelectCall(self.stage, share=self.share / parts, _ms=self._ms, _events=self._events)
                for _ in range(parts)]

    def stop(self) -> None:
        if self._events is not None:
            self._events[1].record()
        else:
            self._ms = (self._ms + time.perf_counter()) * 1e3

    @property
    def ms(self) -> float:
        if self._events is not None:
            begin, end = self._events
            end.synchronize()
            self._ms, self._events = float(begin.elapsed_time(end)), None
        return float(self._ms) * self.share


@dataclass
class SampleRecord:
    """Token counts of one sample during prefill (spec README §4, input convention)."""

    n_visual: int
    n_text: int
    visual_per_layer: list[int]
    events: list[PruningEvent] = field(default_factory=list)
    #: Offsets of each image's tokens in the sample's visual-token list (len = images + 1).
    image_offsets: list[int] = field(default_factory=list)
    #: Per image of the sample: what the method stored in `ImageTokens.memo["record"]` during this prefill
    #: (e.g. DCP-Prune's κ_A and branch), None where it stored nothing or did not run.
    method_info: list[dict | None] = field(default_factory=list)

    @property
    def retained_tokens(self) -> int:
        """Visual tokens entering decoder layer 0."""
        return self.visual_per_layer[0] if self.visual_per_layer else self.n_visual

    @property
    def layer_avg_tokens(self) -> float:
        """n̄ = mean over decoder layers of the visual tokens entering each layer."""
        return sum(self.visual_per_layer) / len(self.visual_per_layer) if self.visual_per_layer else 0.0


@dataclass
class RunRecord:
    """The last prefill of a patched model.

    sequence_index: (B, L_out) int64, for each row of the model's output (logits, last hidden state),
    the index of the input row it comes from (−1 on padding); None when nothing was pruned.
    """

    method: str
    budget: str
    positions: str
    samples: list[SampleRecord]
    dims: LLMDims
    bytes_per_elem: int
    sequence_index: torch.Tensor | None = None
    #: Run-level facts the method reports (`method.record_info()`, e.g. DCP-Prune's τ_κ and its source), or None.
    method_info: dict | None = None
    #: every `method.select` call of the prefill, in call order (none when nothing was pruned)
    selections: list[SelectCall] = field(default_factory=list)

    @property
    def selection_ms(self) -> float:
        """Total time of the method's `select` calls in this prefill (ms)."""
        return sum(c.ms for c in self.selections)

    @property
    def flops(self) -> dict[str, float]:
        """Analytic LLM prefill FLOPs of the batch in the three conventions of spec README §5."""
        total = {"fastv": 0.0, "swiglu": 0.0, "exact": 0.0}
        for s in self.samples:
            for k, v in prefill_flops_all(s.visual_per_layer, s.n_text, self.dims).items():
                total[k] += v
        return total

    @property
    def kv_bytes(self) -> int:
        """KV-cache bytes of the batch right after prefill (unpadded rows)."""
        return sum(kv_cache_bytes(s.visual_per_layer, s.n_text, self.dims, self.bytes_per_elem) for s in self.samples)

    @property
    def retained_tokens(self) -> list[int]:
        return [s.retained_tokens for s in self.samples]

    @property
    def layer_avg_tokens(self) -> list[float]:
        return [s.layer_avg_tokens for s in self.samples]

    def summary(self) -> dict:
        """Batch means and totals as plain numbers (for logs and JSON)."""
        n = max(len(self.samples), 1)
        return {
            "method": self.method,
            "budget": self.budget,
            "n_visual": sum(s.n_visual for s in self.samples) / n,
            "retained_tokens": sum(self.retained_tokens) / n,
            "layer_avg_tokens": sum(self.layer_avg_tokens) / n,
            "flops": self.flops,
            "kv_bytes": self.kv_bytes,
        }
