"""Tiny random models built from configs (real HF classes, no downloads), for tests, demos and docs."""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .models.synthetic import (  # noqa: F401  (re-exported: the synthetic inputs of each family)
    INTERNVL_IMG_END_ID,
    INTERNVL_IMG_START_ID,
    gemma3_inputs,
    image_size_to_num_patches_onevision,
    internvl_inputs,
    llava_inputs,
    llava_next_inputs,
    llava_onevision_inputs,
    qwen3_video_inputs,
    qwen_inputs,
    qwen_video_inputs,
)

IMAGE_TOKEN_ID = 250


def _keywords_checked(factory):
    """A `tiny_*` factory that refuses positional arguments and unknown keywords with a TypeError naming the
    keywords it accepts (a misspelt or unsupported size must not silently give the default model)."""
    accepted = [n for n, p in inspect.signature(factory).parameters.items() if p.kind is p.KEYWORD_ONLY]

    @functools.wraps(factory)
    def checked(*args, **kw):
        unknown = [k for k in kw if k not in accepted]
        if args or unknown:
            what = f"unknown keyword argument(s) {', '.join(map(repr, unknown))}" if unknown else "positional arguments"
            raise TypeError(f"{factory.__name__}() got {what}; it accepts the keywords {', '.join(accepted)}")
        return factory(**kw)

    return checked


def _instantiate(model_class, config, attn: str, dtype: torch.dtype | None = None):
    """A tiny test model of `model_class` from `config`: eval mode, attention `attn`, pad id 0, no EOS."""
    config._attn_implementation = attn
    model = model_class(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    model.set_attn_implementation(attn)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def _tiny_qwen2_text(
    layers: int, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128, vocab: int = 256
) -> dict:
    """The tiny Qwen2 language model (64 wide, GQA 4/2 by default) of the LLaVA-OneVision and InternVL test models."""
    return dict(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


@_keywords_checked
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
    return _instantiate(LlavaForConditionalGeneration, config, attn, dtype)


# --- Qwen2.5-VL ----------------------------------------------------------------------------------------
QWEN_IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_VISION_START_ID, QWEN_VISION_END_ID = 250, 251, 252, 253


@_keywords_checked
def tiny_qwen2_5_vl(
    *,
    seed: int = 0,
    attn: str = "sdpa",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    window_size: int = 56,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised `Qwen2_5_VLForConditionalGeneration` (M-RoPE sections (2, 3, 3), head_dim 16).

    The ViT has `vision_depth` blocks, the last one full attention, the others windowed; `window_size=56`
    px makes windows of 2×2 merged tokens so the window permutation is non-trivial on small images.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_heads=4,
            out_hidden_size=hidden,
            fullatt_block_indexes=[vision_depth - 1],
            window_size=window_size,
        ),
        image_token_id=QWEN_IMAGE_TOKEN_ID,
        video_token_id=QWEN_VIDEO_TOKEN_ID,
        vision_start_token_id=QWEN_VISION_START_ID,
        vision_end_token_id=QWEN_VISION_END_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _instantiate(Qwen2_5_VLForConditionalGeneration, config, attn, dtype)


# --- LLaVA-NeXT ----------------------------------------------------------------------------------------
@_keywords_checked
def tiny_llava_next(
    *,
    seed: int = 0,
    attn: str = "sdpa",
    layers: int = 4,
    image_size: int = 56,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    dtype: torch.dtype | None = None,
):
    """A random `LlavaNextForConditionalGeneration`: 4×4-token tiles (56 px, patch 14), pinpoints up to 2×2 tiles."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    s = image_size
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
            image_size=s,
            patch_size=14,
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
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
    )
    return _instantiate(LlavaNextForConditionalGeneration, config, attn, dtype)


# --- Qwen3-VL ------------------------------------------------------------------------------------------
@_keywords_checked
def tiny_qwen3_vl(
    *,
    seed: int = 0,
    attn: str = "sdpa",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vision_depth: int = 3,
    deepstack: tuple[int, ...] = (0, 1),
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised `Qwen3VLForConditionalGeneration`: interleaved M-RoPE sections (4, 2, 2) on
    head_dim 16, q/k norms, a `vision_depth`-block ViT (patch 16, 2×2 merge: one LLM token per 32×32 px) and
    DeepStack levels from ViT blocks `deepstack`, added after decoder layers 0, 1, …

    Inputs: `qwen_inputs` / `qwen_video_inputs` with sizes in multiples of 32 px (videos: one frame group per
    `<|vision_start|>` run, as the Qwen3-VL processor's timestamps separate them: `qwen3_video_inputs`)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=256,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=16,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=list(deepstack),
        ),
        image_token_id=QWEN_IMAGE_TOKEN_ID,
        video_token_id=QWEN_VIDEO_TOKEN_ID,
        vision_start_token_id=QWEN_VISION_START_ID,
        vision_end_token_id=QWEN_VISION_END_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _instantiate(Qwen3VLForConditionalGeneration, config, attn, dtype)


# --- LLaVA-OneVision -----------------------------------------------------------------------------------
ONEVISION_VIDEO_TOKEN_ID = 251


@_keywords_checked
def tiny_llava_onevision(
    *,
    seed: int = 0,
    attn: str = "sdpa",
    layers: int = 4,
    image_size: int = 56,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    dtype: torch.dtype | None = None,
):
    """A random `LlavaOnevisionForConditionalGeneration`: SigLIP tiles of 4×4 tokens (56 px, patch 14, no [CLS]),
    `vision_feature_select_strategy="full"`, a Qwen2 decoder, AnyRes pinpoints up to 4×4 tiles so that large
    images exceed `anyres_max_9` (9 tiles' worth of tokens) and get the model's bilinear down-sizing."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    s = image_size
    pinpoints = [[s * a, s * b] for a in range(1, 5) for b in range(1, 5)]
    config = LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=s,
            patch_size=14,
        ),
        text_config=_tiny_qwen2_text(layers, hidden, heads, kv_heads, 2 * hidden),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=ONEVISION_VIDEO_TOKEN_ID,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return _instantiate(LlavaOnevisionForConditionalGeneration, config, attn, dtype)


# --- Gemma 3 -------------------------------------------------------------------------------------------
GEMMA_BOI_ID, GEMMA_EOI_ID = 252, 253


@_keywords_checked
def tiny_gemma3(
    *,
    seed: int = 0,
    attn: str = "sdpa",
    layers: int = 6,
    sliding_window: int = 512,
    dtype: torch.dtype | None = None,
):
    """A random `Gemma3ForConditionalGeneration`: SigLIP on 112 px (8×8 patches) average-pooled to 4×4 = 16
    soft tokens per image / pan-and-scan crop, a decoder whose layers alternate sliding (window
    `sliding_window`) and full attention (pattern 2: odd layers full), per-type RoPE, q/k norms."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    config = Gemma3Config(
        text_config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=sliding_window,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=112,
            patch_size=14,
            vision_use_head=False,
        ),
        mm_tokens_per_image=16,
        boi_token_index=GEMMA_BOI_ID,
        eoi_token_index=GEMMA_EOI_ID,
        image_token_index=IMAGE_TOKEN_ID,
    )
    return _instantiate(Gemma3ForConditionalGeneration, config, attn, dtype)


# --- InternVL (hf) -------------------------------------------------------------------------------------


@_keywords_checked
def tiny_internvl(
    *,
    seed: int = 0,
    attn: str = "sdpa",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    dtype: torch.dtype | None = None,
):
    """A random `InternVLForConditionalGeneration`: InternViT tiles of 112 px (8×8 patches + [CLS]), pixel
    shuffle 0.5 -> 4×4 = 16 tokens per tile, Qwen2 decoder."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=[112, 112],
            patch_size=[14, 14],
        ),
        text_config=_tiny_qwen2_text(layers, hidden, heads, kv_heads, 2 * hidden),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=16,
    )
    return _instantiate(InternVLForConditionalGeneration, config, attn, dtype)


