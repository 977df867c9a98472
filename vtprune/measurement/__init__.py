"""Measurement utilities: analytic FLOPs and KV-cache bytes (spec README §4, §5)."""

import importlib
import sys
import types

# public name -> submodule (imported on first access, PEP 562: `import vtprune.measurement` stays cheap)
_LAZY = {
    "CONVENTIONS": "flops",
    "LLM_PRESETS": "flops",
    "VISION_PRESETS": "flops",
    "Convention": "flops",
    "FlopsReport": "flops",
    "LLMDims": "flops",
    "QwenVisionDims": "flops",
    "VisionDims": "flops",
    "decode_flops": "flops",
    "kv_cache_bytes": "flops",
    "layer_avg_tokens": "flops",
    "layer_flops": "flops",
    "prefill_flops": "flops",
    "prefill_flops_all": "flops",
    "projector_flops": "flops",
    "qwen_vit_flops": "flops",
    "retained_tokens": "flops",
    "tokens_per_layer": "flops",
    "vision_flops": "flops",
    "visual_kv_bytes": "flops",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:  # a submodule not imported yet (the eager package used to import them all)
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """A lazily exported function named like its submodule (e.g. `evaluate` in `evaluate.py`) stays the function
    when the submodule is imported (the import system sets the submodule as an attribute of its package)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return  # the submodule stays reachable through sys.modules and `from ... import`
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
