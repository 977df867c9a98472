"""The vision features the built-in model's decoder reads: the CLIP tower's penultimate layer, [CLS] dropped."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def penultimate_only(vision_tower: nn.Module):
    """Run the CLIP tower without its last layer: last_hidden_state == hidden_states[-2] of the full tower."""
    enc = getattr(vision_tower, "vision_model", vision_tower).encoder
    layers = enc.layers
    enc.layers = layers[:-1]
    try:
        yield
    finally:
        enc.layers = layers


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer patch features without [CLS]: [B, 3, 336, 336] -> [B, 576, Dv]."""
    tower = model.model.vision_tower
    with penultimate_only(tower):
        return tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
