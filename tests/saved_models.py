"""Tiny LLaVA-NeXT and Qwen2.5-VL checkpoints saved with a word-level tokenizer, processor and chat template,
so that loading code (`vtprune.runner.load`, `from_pretrained`) runs on real directories offline.

Prompts are words `w<id>`; the chat templates end the generation prompt with `w8` (NeXT) / `w9` (Qwen).
"""

from __future__ import annotations

from pathlib import Path

from factories import tiny
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor, PreTrainedTokenizerFast

from vtprune.models.qwen_inputs import qwen_image_processor
from vtprune.testing import (
    IMAGE_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_ID,
    QWEN_VISION_START_ID,
)

QWEN_TEMPLATE = (
    "{% for m in messages %}<s> {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %} w9{% endif %}"
)
NEXT_TEMPLATE = (
    "{% for m in messages %}w4 {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} w8{% endif %}"
)


def word_tokenizer(specials: dict[int, str]) -> PreTrainedTokenizerFast:
    """A 256-word tokenizer (`w<id>`, left padding) with the given special tokens at their ids."""
    base = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>", **specials}
    tok = Tokenizer(models.WordLevel(vocab={base.get(i, f"w{i}"): i for i in range(256)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": list(specials.values())})
    return fast


def save_tiny_families(root: Path, layers: int = 4) -> dict[str, Path]:
    """Save a tiny LLaVA-NeXT (+ LlavaNextProcessor) and Qwen2.5-VL (+ tokenizer and image processor) under
    `root`.  -> {"llava_next": dir, "qwen2_5_vl": dir}."""
    nxt = tiny("llava_next", layers=layers)
    tile = nxt.config.vision_config.image_size
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": tile},
            crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=nxt.config.image_grid_pinpoints,
        ),
        tokenizer=word_tokenizer({IMAGE_TOKEN_ID: "<image>"}),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=NEXT_TEMPLATE,
    )
    nxt.save_pretrained(root / "next")
    proc.save_pretrained(root / "next")
    qwen = tiny("qwen2_5_vl", layers=layers)
    tok = word_tokenizer(
        {
            QWEN_IMAGE_TOKEN_ID: "<|image_pad|>",
            QWEN_VIDEO_TOKEN_ID: "<|video_pad|>",
            QWEN_VISION_START_ID: "<|vision_start|>",
            QWEN_VISION_END_ID: "<|vision_end|>",
        }
    )
    tok.chat_template = QWEN_TEMPLATE
    qwen.save_pretrained(root / "qwen")
    tok.save_pretrained(root / "qwen")
    qwen_image_processor().save_pretrained(root / "qwen")
    return {"llava_next": root / "next", "qwen2_5_vl": root / "qwen"}


def save_tiny_2026_families(root: Path) -> dict[str, Path]:
    """Save a tiny LLaVA-OneVision, Gemma 3 and InternVL, each with a word-level tokenizer and its PIL image
    processor (no processor object: their processors need torchvision) under `root`.  -> {family: dir}."""
    import transformers as T

    from vtprune import testing as tt

    ov = tiny("llava_onevision")
    s = ov.config.vision_config.image_size
    ov.save_pretrained(root / "ov")
    word_tokenizer({tt.IMAGE_TOKEN_ID: "<image>"}).save_pretrained(root / "ov")
    T.LlavaOnevisionImageProcessorPil(
        size={"height": s, "width": s}, image_grid_pinpoints=ov.config.image_grid_pinpoints
    ).save_pretrained(root / "ov")
    g = tiny("gemma3")
    gs = g.config.vision_config.image_size
    g.save_pretrained(root / "gemma")
    word_tokenizer(
        {
            tt.IMAGE_TOKEN_ID: "<image_soft_token>",
            tt.GEMMA_BOI_ID: "<start_of_image>",
            tt.GEMMA_EOI_ID: "<end_of_image>",
        }
    ).save_pretrained(root / "gemma")
    T.Gemma3ImageProcessorPil(size={"height": gs, "width": gs}).save_pretrained(root / "gemma")
    iv = tiny("internvl")
    iv.save_pretrained(root / "ivl")
    word_tokenizer(
        {tt.IMAGE_TOKEN_ID: "<IMG_CONTEXT>", tt.INTERNVL_IMG_START_ID: "<img>", tt.INTERNVL_IMG_END_ID: "</img>"}
    ).save_pretrained(root / "ivl")
    T.GotOcr2ImageProcessorPil(size={"height": 112, "width": 112}, crop_to_patches=True, max_patches=6).save_pretrained(
        root / "ivl"
    )
    return {"llava_onevision": root / "ov", "gemma3": root / "gemma", "internvl": root / "ivl"}
