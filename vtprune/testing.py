"""Tiny random models built from configs (real HF classes, no downloads), for tests, demos and docs."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 250


def tiny_llava(
    *,
    seed: int = 0,
    attn: str = "sdpa",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
    image_size: int = 336,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    dtype: torch.dtype = torch.float32,
) -> LlavaForConditionalGeneration:
    """A randomly initialised `LlavaForConditionalGeneration` with LLaVA-1.5 geometry (24×24 = 576 tokens)."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            pad_token_id=0,
            max_position_embeddings=4096,
        ),
        image_token_id=IMAGE_TOKEN_ID,
    )
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def llava_inputs(model, prompts: list[tuple[list[int], list[int]]], *, seed: int = 0, images: int = 1) -> dict:
    """Left-padded inputs: each prompt is (prefix ids, suffix ids) around `images` image spans.

    -> {input_ids (B, L), attention_mask (B, L), pixel_values (B·images, 3, S, S)}.
    """
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    rows = [pre + [cfg.image_token_id] * (n * images) + post for pre, post in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    pixels = torch.randn(len(rows) * images, 3, size, size, generator=gen).to(model.dtype)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
