"""`VisionCapture`: vision-encoder signals caught by hooks on the adapter's vision modules.

The stock model encodes the images inside `generate` (or in the forward) before the prefill pre-hook sees the
features; the hooks store what the adapter computes from each vision module (`vision_signals`,
`vision_output_signals`) here, and the `vision`/`pre_llm` stage takes it (`attach`). A method running the
projector (`ImageTokens.project`) goes through `project`, which does not feed the hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedInputError
from ..models.base import ModelAdapter
from .state import ImageState


class VisionCapture:
    """Signals captured from the vision tower since the last `clear` / `attach`."""

    def __init__(self, *, adapter: ModelAdapter, method_name: str, model_name: str) -> None:
        self._adapter = adapter
        self._method_name = method_name
        self._model_name = model_name
        self._captured: list[dict[str, torch.Tensor]] = []
        self._muted = False  # True while a method runs the projector

    def install(self, handles: list) -> None:
        """Register the pre-hooks on the adapter's vision modules and the hooks on its vision output modules."""
        for module in self._adapter.vision_hook_modules():
            handles.append(module.register_forward_pre_hook(self._on_attention, with_kwargs=True))
        for module in self._adapter.vision_output_modules():
            handles.append(module.register_forward_hook(self._on_output))

    def clear(self) -> None:
        self._captured.clear()

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """`ImageTokens.project`: the adapter's projector, (k, C) -> (k, D), without feeding the vision hooks."""
        self._muted = True
        try:
            return self._adapter.project_vision(feats)
        finally:
            self._muted = False

    def attach(self, images: list[ImageState], wanted: frozenset[str]) -> None:
        """Hand the captured signals named `wanted` to the images (one entry per image, in prompt order) and start
        a new capture. Refuses a call without captured signals or with a different number of images."""
        captured, self._captured = self._captured, []
        if not captured:
            raise UnsupportedInputError(
                f"method {self._method_name!r} needs vision-encoder signals {sorted(wanted)}: pass pixel_values "
                "(precomputed mm_encoder_outputs carry none)"
            )
        captured = self._adapter.collate_vision_signals(captured)
        missing = sorted(n for n in wanted if not any(n in c for c in captured))
        if missing:
            raise UnsupportedInputError(f"{self._model_name} does not provide the vision signals {missing}")
        merged = {name: [t for c in captured if name in c for t in c[name]] for name in wanted}  # per image
        if len(next(iter(merged.values()))) != len(images):
            raise UnsupportedInputError(
                f"vision signals were captured for {len(next(iter(merged.values())))} images but the batch "
                f"has {len(images)} (beam search / num_return_sequences with vision-stage methods is unsupported)"
            )
        for i, img in enumerate(images):
            img.signals.update({name: t[i] for name, t in merged.items()})

    def _on_attention(self, module: nn.Module, args, kwargs) -> None:
        if self._muted:
            return
        x = kwargs.get("hidden_states", args[0] if args else None)
        with torch.no_grad():
            out = self._adapter.vision_signals(module, x, kwargs)
        if out is not None:
            self._captured.append(out)

    def _on_output(self, module: nn.Module, args, output) -> None:
        if self._muted:
            return
        with torch.no_grad():
            out = self._adapter.vision_output_signals(module, output)
        if out:
            self._captured.append(out)
