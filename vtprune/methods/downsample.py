"""`downsample`: image downsampling (VTC-Bench, spec baselines.md).

- Fixed-resolution models (LLaVA-1.5 / LLaVA-NeXT: 336-px CLIP with fixed position embeddings): an alias
  of `pool` (Our decision): 2-D average pooling of each grid of projector outputs to ≈ K cells, same
  options (`mode`, `exact`), same realised count h'·w' and cell representatives; cost O(N·D).
- Dynamic-resolution models (Qwen2.5-VL): downsampling is an *input* transform: the image is shrunk
  before the processor (`downsample_image`: per-side factor f = sqrt(ρ), or an integer `factor=D`,
  bicubic), the model computes its own smaller grid and M-RoPE ids, and the ViT gets cheaper too. A
  forward hook only sees patches the processor already made, so `vtprune.apply(qwen, "downsample", …)`
  is refused with a message pointing here; `vtprune eval`/`run` apply the transform to the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import BudgetError, VtpruneError
from . import register
from .base import option
from .pool import Pool2D, PoolConfig


@dataclass
class DownsampleConfig(PoolConfig):
    #: VTC-Bench integer factor D (new size (W//D, H//D)) for dynamic-resolution models; None = sqrt(ρ).
    factor: int | None = option(None, ge=1)


@register
class Downsample(Pool2D):
    """`pool` under the name `downsample` on fixed-resolution models; an image resize on dynamic ones."""

    name = "downsample"
    config_class = DownsampleConfig
    #: On a dynamic-resolution model this method is an input transform (see `downsample_image`).
    resizes_images = True

    def __init__(self, config: DownsampleConfig | None = None):
        super().__init__(config)
        if self.config.factor is not None and (not isinstance(self.config.factor, int) or self.config.factor < 1):
            raise VtpruneError(f"downsample factor must be a positive integer, got {self.config.factor!r}")


def downsampled_size(width: int, height: int, ratio: float | None = None, factor: int | None = None) -> tuple[int, int]:
    """New (W, H) of an image for a token ratio ρ (per-side f = sqrt(ρ), at least 28 px) or an integer D."""
    if (ratio is None) == (factor is None):
        raise VtpruneError("give exactly one of ratio (token share in (0, 1]) or factor (integer D >= 1)")
    if factor is not None:
        if not isinstance(factor, int) or factor < 1:
            raise VtpruneError(f"downsample factor must be a positive integer, got {factor!r}")
        return max(1, width // factor), max(1, height // factor)
    if not 0.0 < ratio <= 1.0:
        raise BudgetError(f"a downsampling ratio must lie in (0, 1], got {ratio!r}")
    f = math.sqrt(ratio)
    return max(28, round(width * f)), max(28, round(height * f))


def downsample_image(image, ratio: float | None = None, factor: int | None = None):
    """A PIL image shrunk for a token ratio ρ or an integer factor D (bicubic), before the processor."""
    from PIL import Image

    size = downsampled_size(image.width, image.height, ratio, factor)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)
