"""Config factory for the built-in model: stock `LlavaForConditionalGeneration` with LLaVA-1.5 geometry.

CLIP vision tower at 336 px / patch 14 (24x24 = 576 patches + [CLS]), feature from the penultimate
layer with [CLS] dropped ("default"), 2-layer GELU projector, small Llama decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .scenes import CELL, IMAGE_SIZE
from .tokenizer import NUM_IMAGE_TOKENS, vocabulary


@dataclass
class ModelSize:
    """Widths and depths; defaults are the shipped `shapes-llava` model."""

    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_width: int = 160
    text_layers: int = 3
    text_heads: int = 5
    text_mlp: int = 480

    def to_dict(self) -> dict:
        return asdict(self)


# The v3 model organism (issue 21): LLaVA-1.5-7B's decoder depth, 32 layers, so every in-LLM method acts at
# exactly the paper's layers and each layer-averaged budget is feasible exactly where it is on 7B. Shallower
# does not do: FastV's K = 2 and PDrop's first boundary are not scaled (n̄ = 64 infeasible below 19 layers)
# and SparseVLM's scaled first cut leaves its layer-averaged 64 infeasible on 24 layers
# (tests/test_testbed_v3_layers.py). Narrow (64 wide, 2 heads of 32: a Stage-B step's cost grows with
# layers x width x ~770^2) so the training chain fits in about 3 h on 2 CPU cores (docs/testbed.md, "v3").
V3 = ModelSize(vision_width=128, vision_layers=4, vision_heads=4, vision_mlp=512,
               text_width=64, text_layers=32, text_heads=2, text_mlp=192)

TINY = ModelSize(vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                 text_width=32, text_layers=1, text_heads=2, text_mlp=64)


def build_config(size: ModelSize | None = None, vocab: dict[str, int] | None = None) -> LlavaConfig:
    """LlavaConfig with the testbed vocabulary (padded to a multiple of 8; `vocab`: another word -> id table,
    e.g. the v3 benchmark's) and LLaVA-1.5 geometry."""
    size = size or ModelSize()
    vocab = vocab or vocabulary()
    vocab_size = (len(vocab) + 7) // 8 * 8
    vision = CLIPVisionConfig(
        hidden_size=size.vision_width, intermediate_size=size.vision_mlp,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
        image_size=IMAGE_SIZE, patch_size=CELL, num_channels=3, hidden_act="quick_gelu",
        projection_dim=size.vision_width)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.text_width, intermediate_size=size.text_mlp,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
        image_seq_length=NUM_IMAGE_TOKENS, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False)


def build_model(size: ModelSize | None = None, seed: int = 0,
                vocab: dict[str, int] | None = None) -> LlavaForConditionalGeneration:
    """Freshly initialised model (fp32), deterministic given `seed` (`vocab`: see `build_config`)."""
    import torch

    torch.manual_seed(seed)
    cfg = build_config(size, vocab)
    model = LlavaForConditionalGeneration(cfg)
    vocab = vocab or vocabulary()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    model.generation_config.bos_token_id = vocab["<s>"]
    return model
