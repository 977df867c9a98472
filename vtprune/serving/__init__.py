"""vtprune inside vLLM: pre-LLM visual-token pruning as a `vllm.general_plugins` plugin.

Install `vtprune[vllm]` and the entry point `vtprune = vtprune.serving:register` makes every vLLM process
(also the spawned engine core) register vtprune's subclass of vLLM's LLaVA model. Pruning is switched on per
model through vLLM's own config surface, e.g.

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"vtprune": {"method": "divprune", "budget": 64}}'
    LLM("llava-hf/llava-1.5-7b-hf", hf_overrides={"vtprune": {"method": "divprune", "budget": 64}})

or, without any flag, a `"vtprune": {...}` key in the checkpoint's config.json. Keys: `method`, `budget` (int
tokens per image or a ratio in (0, 1)), `options` (the method's options), `record` (a JSONL path that receives
each pruned image's kept indices). Without a `vtprune` section the model is vLLM's own.
"""

from __future__ import annotations

#: Architectures the plugin registers (name in config.json -> vtprune's subclass of vLLM's model class).
MODELS = {
    "LlavaForConditionalGeneration": "vtprune.serving.llava:VtpruneLlavaForConditionalGeneration",
}


def register() -> None:
    """The `vllm.general_plugins` entry point: register vtprune's model classes (lazily imported, so this is
    cheap and safe to call in every vLLM process, any number of times)."""
    from vllm import ModelRegistry

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
