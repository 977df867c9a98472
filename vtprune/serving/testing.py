"""Tiny random LLaVA-1.5 checkpoints that vLLM can load offline (tests, the serving benchmark).

`save_llava(root)` writes config, safetensors weights, a word-level tokenizer (`w<id>` words, `<image>` at
id 250) and a `LlavaProcessor` (CLIP preprocessing without torchvision). Prompts are text like
"w5 w6 <image> w7 w8"; `<image>` expands to the model's placeholders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..testing import IMAGE_TOKEN_ID, tiny_llava


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


def noise_image(seed: int, size: int = 336):
    """A deterministic RGB noise image (PIL), `size`×`size`."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())
