"""Tiny random LLaVA-1.5, Qwen2.5-VL and Qwen3-VL checkpoints that vLLM can load offline (tests, the serving benchmark).

`save_llava(root)` writes config, safetensors weights, a word-level tokenizer (`w<id>` words, `<image>` at
id 250) and a `LlavaProcessor` (CLIP preprocessing without torchvision). Prompts are text like
"w5 w6 <image> w7 w8"; `<image>` expands to the model's placeholders.
`save_qwen2_5_vl(root)` writes a tiny Qwen2.5-VL the same way; prompts are text like
"w5 <|vision_start|><|image_pad|><|vision_end|> w7" (`QWEN_IMAGE` is the middle part); `save_qwen3_vl(root)`
a tiny Qwen3-VL (DeepStack) with the same prompt format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..testing import (
    IMAGE_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_ID,
    QWEN_VISION_START_ID,
    tiny_llava,
)

#: One image in a tiny Qwen2.5-VL prompt (the processor expands `<|image_pad|>` to the image's tokens).
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def word_tokenizer(specials: dict[int, str], vocab: int = 256):
    """A `vocab`-word whitespace tokenizer (`w<id>`, ids 0-3 pad/bos/eos/unk) with special tokens at their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>", **specials}
    tok = Tokenizer(models.WordLevel(vocab={base.get(i, f"w{i}"): i for i in range(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": list(specials.values())})
    return fast


def save_llava(root: str | Path, *, seed: int = 0, vision_qk_scale: float = 1.0, **model_kwargs) -> Path:
    """Save a tiny random `LlavaForConditionalGeneration` (+ processor, tokenizer) under `root`; -> root.

    model_kwargs go to `vtprune.testing.tiny_llava` (layers, hidden, heads, ...). The CLIP weights are stored
    under `vision_tower.vision_model.*` as in the llava-hf checkpoints (transformers 5.19 saves a freshly built
    tower as `vision_tower.*`, which vLLM's loader does not map). `vision_qk_scale` multiplies the CLIP query and
    key projections: a sharper [CLS] attention than random init gives (fewer near-ties between tokens' scores)."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    root = Path(root)
    model_kwargs = {"hidden": 128, "intermediate": 256, **model_kwargs}  # head_dim 32: vLLM's CPU attention minimum
    model = tiny_llava(seed=seed, **model_kwargs)
    if vision_qk_scale != 1.0:
        with torch.no_grad():
            tower = model.model.vision_tower
            for layer in getattr(tower, "vision_model", tower).encoder.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(vision_qk_scale)
    model.config.bos_token_id = 1
    model.config.text_config.bos_token_id = 1
    model.config.text_config.eos_token_id = 2
    model.save_pretrained(root)
    weights = root / "model.safetensors"
    state = load_file(weights)
    fixed = {}
    for key, value in state.items():
        head, sep, rest = key.partition("vision_tower.")
        if sep and head in ("", "model.") and not rest.startswith("vision_model."):
            key = f"{head}vision_tower.vision_model.{rest}"
        fixed[key] = value
    save_file(fixed, weights, metadata={"format": "pt"})
    vc = model.config.vision_config
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size}
        ),
        tokenizer=word_tokenizer({IMAGE_TOKEN_ID: "<image>"}),
        patch_size=vc.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(root)
    gen = root / "generation_config.json"
    cfg = json.loads(gen.read_text()) if gen.exists() else {}
    cfg.update({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None})
    gen.write_text(json.dumps(cfg, indent=2))
    return root


def save_qwen2_5_vl(
    root: str | Path,
    *,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 64,
    vision_depth: int = 2,
    window_size: int = 56,
    vision_qk_scale: float = 1.0,
) -> Path:
    """Save a tiny random `Qwen2_5_VLForConditionalGeneration` (+ processor, tokenizer) under `root`; -> root.

    head_dim 32 (vLLM's CPU attention minimum) with M-RoPE sections (4, 6, 6); the ViT has `vision_depth` blocks,
    the last one full attention, windows of 2×2 merged tokens (`window_size=56` px, patch 14, merge 2). The
    processor resizes to multiples of 28 px between 4 and 256 merged tokens. `vision_qk_scale` multiplies the
    ViT's query/key weights (a peaked attention: fewer near-ties between tokens' scores)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
        Qwen2VLVideoProcessor,
    )

    root = Path(root)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=256,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
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
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    if vision_qk_scale != 1.0:
        with torch.no_grad():
            for block in model.model.visual.blocks:
                width = block.attn.qkv.weight.shape[0] // 3
                block.attn.qkv.weight[: 2 * width].mul_(vision_qk_scale)
                block.attn.qkv.bias[: 2 * width].mul_(vision_qk_scale)
    model.save_pretrained(root)
    specials = {
        QWEN_IMAGE_TOKEN_ID: "<|image_pad|>",
        QWEN_VIDEO_TOKEN_ID: "<|video_pad|>",
        QWEN_VISION_START_ID: "<|vision_start|>",
        QWEN_VISION_END_ID: "<|vision_end|>",
    }
    tokenizer = word_tokenizer(specials)
    size = {"shortest_edge": 4 * 28 * 28, "longest_edge": 256 * 28 * 28}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size),
    )
    processor.save_pretrained(root)
    gen = root / "generation_config.json"
    cfg = json.loads(gen.read_text()) if gen.exists() else {}
    cfg.update({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None})
    gen.write_text(json.dumps(cfg, indent=2))
    return root


def save_qwen3_vl(
    root: str | Path,
    *,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    vision_hidden: int = 64,
    vision_depth: int = 3,
    deepstack: tuple[int, ...] = (0, 1),
    vision_qk_scale: float = 1.0,
) -> Path:
    """Save a tiny random `Qwen3VLForConditionalGeneration` (+ processor, tokenizer) under `root`; -> root.

    head_dim 32 (vLLM's CPU attention minimum) with interleaved M-RoPE sections (8, 4, 4); a `vision_depth`-block
    full-attention ViT (patch 16, 2×2 merge: one LLM token per 32×32 px) with DeepStack levels from blocks
    `deepstack` (added after decoder layers 0, 1, ...). The processor resizes to multiples of 32 px between 4 and
    256 merged tokens. Prompts as for `save_qwen2_5_vl` (`QWEN_IMAGE`)."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    root = Path(root)
    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=256,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=hidden // heads,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [8, 4, 4],
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
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
    model = Qwen3VLForConditionalGeneration(config).eval()
    if vision_qk_scale != 1.0:
        with torch.no_grad():
            for block in model.model.visual.blocks:
                width = block.attn.qkv.weight.shape[0] // 3
                block.attn.qkv.weight[: 2 * width].mul_(vision_qk_scale)
                block.attn.qkv.bias[: 2 * width].mul_(vision_qk_scale)
    model.save_pretrained(root)
    specials = {
        QWEN_IMAGE_TOKEN_ID: "<|image_pad|>",
        QWEN_VIDEO_TOKEN_ID: "<|video_pad|>",
        QWEN_VISION_START_ID: "<|vision_start|>",
        QWEN_VISION_END_ID: "<|vision_end|>",
    }
    size = {"shortest_edge": 4 * 32 * 32, "longest_edge": 256 * 32 * 32}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(size=size, patch_size=16, merge_size=2),
        tokenizer=word_tokenizer(specials),
        video_processor=Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2),
    )
    processor.save_pretrained(root)
    gen = root / "generation_config.json"
    cfg = json.loads(gen.read_text()) if gen.exists() else {}
    cfg.update({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None})
    gen.write_text(json.dumps(cfg, indent=2))
    return root


def noise_image(seed: int, size: int | tuple[int, int] = 336):
    """A deterministic RGB noise image (PIL), `size`×`size` (or (width, height))."""
    from PIL import Image

    width, height = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())
