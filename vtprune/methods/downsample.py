"""`downsample`: image downsampling (VTC-Bench, spec baselines.md).

On fixed-resolution models (LLaVA-1.5 / LLaVA-NeXT: 336-px CLIP with fixed position embeddings) it is
an alias of `pool` (Our decision): 2-D average pooling of each grid of projector outputs to ≈ K cells,
same options (`mode`, `exact`), same realised count h'·w' and cell representatives; cost O(N·D).

Not implemented here: the Qwen2.5-VL behaviour (resize the raw image by sqrt(ρ), or by an integer
`factor=D`, before the processor so that the ViT also gets cheaper). That is an input transform that
needs the Qwen adapter; a method only sees visual tokens, so it cannot tell the model family apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from .pool import Pool2D, PoolConfig


@dataclass
class DownsampleConfig(PoolConfig):
    pass


@register
class Downsample(Pool2D):
    """`pool` under the name `downsample` (fixed-resolution LLaVA models)."""

    name = "downsample"
    config_class = DownsampleConfig
