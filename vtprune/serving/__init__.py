"""vtprune inside vLLM: pre-LLM visual-token pruning as a `vllm.general_plugins` plugin.

Install `vtprune[vllm]` and the entry point `vtprune = vtprune.serving:register` makes every vLLM process
(also the spawned engine core) register vtprune's subclasses of vLLM's LLaVA, Qwen2.5-VL and Qwen3-VL models. Pruning is
switched on per model through vLLM's own config surface, e.g.

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"vtprune": {"method": "divprune", "budget": 64}}'
    LLM("llava-hf/llava-1.5-7b-hf", hf_overrides={"vtprune": {"method": "divprune", "budget": 64}})

or, without any flag, a `"vtprune": {...}` key in the checkpoint's config.json. Keys: `method`, `budget` (int
tokens per image or a ratio in (0, 1)), `options` (the method's options), `record` (a JSONL path that receives
each pruned image's kept indices). Without a `vtprune` section the model is vLLM's own. Qwen2.5-VL and Qwen3-VL
also need vLLM's multimodal-pruning path switched on (`--video-pruning-rate`, see `vtprune.serving.qwen2_5_vl`).
"""

from __future__ import annotations

#: Architectures the plugin registers (name in config.json -> vtprune's subclass of vLLM's model class).
MODELS = {
    "LlavaForConditionalGeneration": "vtprune.serving.llava:VtpruneLlavaForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vtprune.serving.qwen2_5_vl:VtpruneQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "vtprune.serving.qwen3_vl:VtpruneQwen3VLForConditionalGeneration",
}


def register() -> None:
    """The `vllm.general_plugins` entry point: register vtprune's model classes (lazily imported, so this is
    cheap and safe to call in every vLLM process, any number of times)."""
    from vllm import ModelRegistry

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    fix_cpu_runner()


def fix_cpu_runner() -> None:
    """vLLM 0.32's `CPUModelRunner.load_model` never sets `is_multimodal_pruning_enabled` (its GPU parent sets it
    after loading the model), so a model's M-RoPE columns are never stripped on CPU. Wrap it to set the flag by
    the GPU runner's rule. Idempotent; a no-op off the CPU platform."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    original = CPUModelRunner.load_model
    if getattr(original, "_vtprune_fixed", False):
        return

    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        if (
            supports_multimodal_pruning(self.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        ):
            self.is_multimodal_pruning_enabled = True

    load_model._vtprune_fixed = True
    CPUModelRunner.load_model = load_model
