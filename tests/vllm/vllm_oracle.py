"""Shared pieces of the vLLM equality oracles (tests/vllm/test_vllm_*.py): the HF-path method wrappers that see
what vLLM's plugin saw (its encoder output and vision signals, its per-image seeds, its empty question)."""

from __future__ import annotations

import torch

from vtprune.methods.cdpruner import CDPruner
from vtprune.methods.random import RandomConfig, RandomPruning


def _with_vllm_inputs(method, embeds, signals: dict):
    """Let a method's `select` on the HF path see vLLM's encoder output and vision signals (image b of the
    batch gets `embeds[b]`, `signals[name][b]`: a (B, ...) tensor or a per-image list), after checking that the
    HF path's own signals agree with vLLM's."""
    inner = method.select
    queue = list(range(len(embeds)))

    def select(stage_index, image, k):
        b = queue.pop(0)
        for name, t in signals.items():
            ref = t[b].float()
            atol = 1e-5 * float(ref.abs().max()) + 1e-7  # fp32 rounding of two encoders, relative to the scale
            torch.testing.assert_close(image.signals[name].float(), ref, rtol=1e-4, atol=atol, msg=name)
            image.signals[name] = t[b]
        image.features = embeds[b]
        return inner(stage_index, image, k)

    method.select = select
    return method


class _PixelSeeded(RandomPruning):
    """`random` with the per-image seed the plugin uses (vLLM's encoder never sees the prompt ids the HF engine
    seeds from); the draw itself is `RandomPruning.select`."""

    def __init__(self, seeds: list[int]):
        super().__init__(RandomConfig())
        self.seeds = list(seeds)

    def select(self, stage_index, image, k):
        image.seed = self.seeds.pop(0)
        return super().select(stage_index, image, k)


class _NoQuestion(CDPruner):
    """`cdpruner` (relevance from the question embeddings) given an empty question, as the plugin gives it."""

    def select(self, stage_index, image, k):
        image.signals["question_embeddings"] = image.features.new_zeros(0, image.features.shape[1])
        return super().select(stage_index, image, k)
