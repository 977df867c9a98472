"""Measurement utilities: analytic FLOPs and KV-cache bytes (spec README §4, §5)."""

from .._lazy import lazy_exports

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


lazy_exports(__name__, _LAZY)
