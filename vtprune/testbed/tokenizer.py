"""Offline word-level tokenizer and a real `LlavaProcessor` for the built-in testbed."""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

from .questions import answer_vocabulary, question_words
from .scenes import CELL, IMAGE_SIZE

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)
TEMPLATE_WORDS: tuple[str, ...] = ("user", "assistant", ":")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_IMAGE_TOKENS = (IMAGE_SIZE // CELL) ** 2  # 576


def vocabulary() -> dict[str, int]:
    """Word -> id; special tokens first (pad=0, bos=1, eos=2, unk=3, <image>=4)."""
    words = list(SPECIAL_TOKENS) + list(TEMPLATE_WORDS)
    for w in (*question_words(), *answer_vocabulary()):
        if w not in words:
            words.append(w)
    return {w: i for i, w in enumerate(words)}


def build_tokenizer(vocab: dict[str, int] | None = None) -> PreTrainedTokenizerFast:
    """Lower-casing word-level tokenizer; prepends <s>; `<image>` is an atomic special token. `vocab`: another
    word -> id table with the same special tokens first (the v3 benchmark's); default the v2 `vocabulary()`."""
    tok = Tokenizer(models.WordLevel(vocab=vocab or vocabulary(), unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "ASSISTANT:" into "assistant", ":"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, padding_side="left", model_max_length=2048)
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return fast


def build_image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing at 336 px (PIL backend: no torchvision needed)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_normalize=True, do_convert_rgb=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def build_processor(vocab: dict[str, int] | None = None) -> LlavaProcessor:
    """LLaVA-1.5 style processor: one `<image>` in the prompt expands to 576 placeholders (`vocab`: see
    `build_tokenizer`)."""
    return LlavaProcessor(image_processor=build_image_processor(), tokenizer=build_tokenizer(vocab),
                          patch_size=CELL, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token=IMAGE)


def prompt(question: str) -> str:
    """LLaVA-1.5 conversation prompt, image first."""
    return f"USER: <image>\n{question} ASSISTANT:"
