"""`downsample` (baselines.md): pool alias on fixed-resolution LLaVA; an image transform on Qwen2.5-VL."""

from __future__ import annotations

import pytest
import torch
from factories import tiny
from PIL import Image

import vtprune
from vtprune.errors import BudgetError, UnsupportedInputError, VtpruneError
from vtprune.methods.downsample import downsample_image, downsampled_size
from vtprune.models.qwen_inputs import qwen_image_processor


def _tokens(processor, image) -> int:
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // 4


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_integer_factor_gives_n_over_d_squared_tokens(factor):
    """Property 5: sides multiples of 28·D within the processor's limits -> exactly N/D² visual tokens."""
    processor = qwen_image_processor()
    side = 28 * factor * 4
    image = Image.new("RGB", (side * 2, side), (120, 30, 200))
    n = _tokens(processor, image)
    small = downsample_image(image, factor=factor)
    assert small.size == (side * 2 // factor, side // factor)
    assert _tokens(processor, small) * factor**2 == n


def test_ratio_rule_and_bad_input():
    assert downsampled_size(1000, 500, ratio=0.25) == (500, 250)
    assert downsampled_size(60, 40, ratio=1 / 9) == (28, 28)  # at least one 28-px cell per side
    image = Image.new("RGB", (56, 56))
    assert downsample_image(image, ratio=1.0) is image
    with pytest.raises(BudgetError, match="ratio"):
        downsampled_size(100, 100, ratio=1.5)
    with pytest.raises(VtpruneError, match="exactly one"):
        downsampled_size(100, 100)
    with pytest.raises(VtpruneError, match="positive integer"):
        downsampled_size(100, 100, factor=0)


def test_refused_as_a_hook_on_dynamic_resolution_models():
    model = tiny("qwen2_5_vl", layers=2)
    with pytest.raises(UnsupportedInputError, match="downsample_image"):
        vtprune.apply(model, "downsample", 0.25)
    assert vtprune.session_of(model) is None
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)
    assert torch.is_tensor(next(model.parameters()))
