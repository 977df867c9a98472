"""Model adapters: one small file per model family. `adapter_for(model)` picks the right one."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedInputError, UnsupportedModelError
from .base import ModelAdapter
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    LlavaOnevisionAdapter,
    Gemma3Adapter,
    InternVLAdapter,
)


def supported_model_classes() -> list[str]:
    return [name for a in ADAPTERS for name in a.model_classes]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for this model instance; raises `UnsupportedModelError` listing the supported classes."""
    if hasattr(model, "_orig_mod"):
        raise UnsupportedInputError("torch.compile'd models cannot be patched; apply vtprune before compiling")
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    raise UnsupportedModelError(f"unsupported model class {name}; supported: {', '.join(supported_model_classes())}")


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for", "supported_model_classes"]
