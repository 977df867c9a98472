"""Adapter for `LlavaForConditionalGeneration` (LLaVA-1.5 and relatives): CLIP tower + Llama decoder."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import UnsupportedInputError
from .base import ModelAdapter

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5: one fixed grid per image (e.g. 24×24 = 576), [CLS] dropped, feature layer −2."""

    model_classes = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)
    uses_processor = True
    rcp_mask_route = True
    image_kwargs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    @property
    def grid_size(self) -> tuple[int, int]:
        vc = self.model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

    def nominal_visual_tokens(self) -> int:
        h, w = self.grid_size
        return h * w

    def encode_images(self, kwargs: dict) -> list[torch.Tensor]:
        extra = {k: kwargs[k] for k in self.image_kwargs[1:] if kwargs.get(k) is not None}
        out = self.model.model.get_image_features(pixel_values=kwargs["pixel_values"], return_dict=True, **extra)
        return list(out.pooler_output)

    def split_images(self, image_rows: torch.Tensor) -> list[torch.Tensor]:
        """Runs of placeholders, each cut into images of the fixed token count (adjacent images)."""
        n = self.nominal_visual_tokens()
        images = []
        for run in super().split_images(image_rows):
            if run.numel() % n:
                raise UnsupportedInputError(
                    f"a run of {run.numel()} image placeholders is not a multiple of the {n} tokens per image"
                )
            images.extend(run.split(n))
        return images

    def image_layout(self, image_index: int, n: int):
        h, w = self.grid_size
        if n != h * w:
            raise UnsupportedInputError(f"image {image_index} has {n} visual tokens, expected {h}×{w} = {h * w}")
        r = torch.arange(n)
        return [(h, w)], torch.stack([r // w, r % w], dim=1), torch.zeros(n, dtype=torch.long)

    @property
    def vision_signal_names(self) -> frozenset[str]:  # type: ignore[override]
        """All vision signals; `vision_cls_features` only when the model drops the [CLS] row (strategy
        "default"): with "full" the [CLS] is candidate 0 already."""
        names = {"cls_attention", "vision_keys", "vision_head_keys", "vision_features"}
        if self.model.config.vision_feature_select_strategy == "default":
            names.add("vision_cls_features")
        if not self.has_cls_token:  # e.g. a SigLIP tower: row 0 is a patch, not a [CLS]
            names -= {"cls_attention", "vision_cls_features"}
        return frozenset(names)

    @property
    def has_cls_token(self) -> bool:
        """True when the vision tower prepends a [CLS] token (CLIP); False for towers without one (SigLIP)."""
        tower = self.model.model.vision_tower
        emb = getattr(tower, "embeddings", None) or getattr(getattr(tower, "vision_model", None), "embeddings", None)
        return emb is not None and hasattr(emb, "class_embedding")

    def missing_signal_hint(self, missing: frozenset[str]) -> str:
        """What to use instead when a method needs signals this model lacks (appended to the engine's refusal)."""
        if missing & {"cls_attention", "vision_cls_features"} and not self.has_cls_token:
            tower = type(self.model.model.vision_tower).__name__
            return (
                f"; {tower} has no [CLS] token, so [CLS]-ranked selection is refused rather than ranking by patch 0: "
                "use a method without [CLS] signals (e.g. divprune, cdpruner, pool, random) instead"
            )
        return ""

    def feature_layer(self) -> nn.Module:
        """The CLIP encoder layer whose output is the model's feature layer (`hidden_states[vision_feature_layer]`)."""
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedInputError("vision signals need a single vision_feature_layer (got a list)")
        layers = self.model.model.vision_tower.encoder.layers
        return layers[len(layers) + layer if layer < 0 else layer - 1]

    def vision_attention_module(self) -> nn.Module:
        return self.feature_layer().self_attn

    def vision_hook_modules(self) -> list[nn.Module]:
        return [self.vision_attention_module(), self.model.model.multi_modal_projector]

    def vision_output_modules(self) -> list[nn.Module]:
        return [self.feature_layer()]

    def vision_output_signals(self, module: nn.Module, output) -> dict[str, torch.Tensor] | None:
        """Feature layer output (n_img, 1 + n, C) -> vision_cls_features (n_img, 1, C): each image's [CLS] row
        (one view per image), pre-projector; nothing with strategy "full" (the [CLS] is a candidate there)."""
        if self.model.config.vision_feature_select_strategy != "default":
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        return {"vision_cls_features": hidden[:, :1]}

    def project_vision(self, feats: torch.Tensor) -> torch.Tensor:
        """(k, C) -> (k, D) through `multi_modal_projector` (token-wise MLP)."""
        return self.model.model.multi_modal_projector(feats)

    @staticmethod
    def _cls_query(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The [CLS] query of one image, x (1, 1 + n, C) -> (1, H, 1, d_h) fp32."""
        return attn.q_proj(x[:, :1]).view(1, 1, attn.num_heads, attn.head_dim).transpose(1, 2).float()

    def vision_signals(self, attn: nn.Module, x: torch.Tensor, kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """[CLS]→patch attention (head mean) and keys of the selected CLIP layer, or the projector's input.

        Attention module: x (n_img, 1 + n, C) is the self-attention input (already `layer_norm1`-ed)
        -> cls_attention (n_img, n) fp32, vision_keys (n_img, n, C), vision_head_keys (n_img, n, d_h).
        Projector: x (n_img, n, C) selected patch features -> vision_features (n_img, n, C).
        """
        if attn is self.model.model.multi_modal_projector:
            return {"vision_features": x}
        b, t, _ = x.shape
        k_flat = attn.k_proj(x)
        k = k_flat.view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
        # the [CLS] row's projection and scores image by image: the same kernels whatever the batch size (M = 1
        # vs M = b GEMMs differ in the last bit on CPU, which flips near-tied rankings), so a batch equals each
        # image alone; a loop over images, not tokens
        keys_t = k.float().transpose(-1, -2)  # (b, H, d_h, t)
        probs = torch.cat(
            [((self._cls_query(attn, x[i : i + 1]) @ keys_t[i : i + 1]) * attn.scale).softmax(-1) for i in range(b)]
        )  # (b, H, 1, t)
        start = 1 if self.model.config.vision_feature_select_strategy == "default" else 0
        return {
            "cls_attention": probs[:, :, 0, start:].mean(1),
            "vision_keys": k_flat[:, start:],
            "vision_head_keys": k.mean(1)[:, start:],
        }

    # --- family facts for applications -------------------------------------------------------------------
    #: the HF processor class that expands the image placeholders (`make_processor`)
    processor_class: ClassVar[str] = "LlavaProcessor"

    def make_processor(self, tokenizer, image_processor):
        """`LlavaProcessor` over the tokenizer + image processor, with the model's patch size and placeholder."""
        import transformers

        cfg = self.model.config
        return getattr(transformers, self.processor_class)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=int(cfg.vision_config.patch_size),
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            num_additional_image_tokens=1,
            image_token=self.image_token_text(tokenizer),
        )

    def _clip_processor_kwargs(self) -> dict:
        side = int(self.model.config.vision_config.image_size)
        return dict(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )

    def default_image_processor(self):
        """CLIP preprocessing at the tower's size: resize the short side, centre crop, CLIP mean / std."""
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(do_center_crop=True, **self._clip_processor_kwargs())

    def synthetic_inputs(self, prompts, image_size=None, seed: int = 0) -> dict:
        """One fixed-size image per prompt (the token count does not depend on its size)."""
        from . import synthetic

        return synthetic.llava_inputs(self.model, prompts, seed=seed)

    def display_layout(self, image, inputs: dict, image_processor):
        """side×side cells over the processed square the model sees (recovered from `pixel_values[0]`)."""
        from .display import square_grid_layout, unnormalise

        view = unnormalise(inputs["pixel_values"][0], image_processor)
        return square_grid_layout("llava", view, self.grid_size[0], "model input")
