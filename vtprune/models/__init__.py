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


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Add an adapter class (checked before the built-in ones); usable as a class decorator."""
    global ADAPTERS
    if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)) or not adapter.model_classes:
        raise TypeError(f"register_adapter expects a ModelAdapter subclass with model_classes, got {adapter!r}")
    ADAPTERS = (adapter, *(a for a in ADAPTERS if a is not adapter))
    return adapter


def adapter_class(model_or_config) -> type[ModelAdapter]:
    """The adapter class for a model, its config or a `model_type` string (a saved directory's config.json);
    `UnsupportedModelError` naming the supported model types otherwise."""
    if isinstance(model_or_config, nn.Module):
        name = type(model_or_config).__name__
        for adapter in ADAPTERS:
            if name in adapter.model_classes:
                return adapter
    config = getattr(model_or_config, "config", model_or_config)
    kind = config if isinstance(config, str) else getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if kind in adapter.model_types:
            return adapter
    known = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise UnsupportedModelError(f"unsupported model type {kind!r}; supported: {known}")


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for this model instance; raises `UnsupportedModelError` listing the supported classes."""
    if hasattr(model, "_orig_mod"):
        raise UnsupportedInputError("torch.compile'd models cannot be patched; apply vtprune before compiling")
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    raise UnsupportedModelError(f"unsupported model class {name}; supported: {', '.join(supported_model_classes())}")


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_class", "adapter_for", "register_adapter", "supported_model_classes"]
