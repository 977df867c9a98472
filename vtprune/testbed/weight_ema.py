"""An exponential moving average of a model's weights during training (`TrainConfig.ema_decay`).

A model soup of runs continued from one parent counted better than any of its members (docs/testbed.md,
"v3 training: twenty-fourth session"): the count read-out is limited by noise that averaging weights removes. The
moving average does the same along one run's own trajectory, at no extra training cost:
ema <- decay * ema + (1 - decay) * weights after every optimiser step (float32 copies of every floating-point
tensor of the model's state dict, the decoder's and the tower's alike).

    ema = WeightEMA(model, decay=0.999)   # starts at the model's current weights
    ...; optimiser.step(); ema.update()
    averaged = ema.averaged_model()       # a copy of the model holding the averaged weights
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """The moving average of `model`'s floating-point state (parameters and buffers), updated in place."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, float(decay)
        self._live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}  # views of the weights
        self.average = {k: v.detach().float().clone() for k, v in self._live.items()}  # float32 copies

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the model's current weights."""
        for key, avg in self.average.items():
            avg.mul_(self.decay).add_(self._live[key].detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.average)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore an average saved by `state_dict` (ValueError when its names or shapes do not fit the model)."""
        if state.keys() != self.average.keys() or any(state[k].shape != v.shape for k, v in self.average.items()):
            raise ValueError("the saved weight average does not fit this model's weights")
        for key, avg in self.average.items():
            avg.copy_(state[key].float())

    def averaged_model(self) -> nn.Module:
        """A deep copy of the model (its dtype, in eval mode) holding the averaged weights; the model is untouched."""
        averaged = copy.deepcopy(self.model)
        live = averaged.state_dict()
        with torch.no_grad():
            for key, avg in self.average.items():
                live[key].copy_(avg.to(live[key].dtype))
        return averaged.eval()
