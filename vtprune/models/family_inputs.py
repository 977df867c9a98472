"""Model inputs from texts + PIL images without the family's processor (`LlavaOnevisionProcessor` and
`InternVLProcessor` need torchvision for their video processors; Gemma 3's is rebuilt the same way).

Each text holds one image placeholder (the tokenizer's token for `config.image_token_id`) per image; the
adapter says how each image's placeholder expands (its `placeholder_spans`, e.g. Gemma 3's
`<start_of_image>` + soft tokens + `<end_of_image>` per crop, InternVL's context tokens per tile,
LLaVA-OneVision's packed feature count) and `expand_placeholders` lays the rows out, left-padded.

`family_inputs(model, tokenizer, texts, images, image_processor)` -> left-padded {input_ids, attention_mask,
pixel_values, …} as the stock forward takes them (the adapter's `prepare_inputs`).
"""

from __future__ import annotations

import torch


def special_token(tokenizer, text: str) -> int | None:
    """The id of a special token the tokenizer knows, else None."""
    tid = tokenizer.convert_tokens_to_ids(text)
    return None if tid is None or tid == tokenizer.unk_token_id else int(tid)


def tokenize_with_images(tokenizer, texts: list[str], image_id: int, n_images: int) -> list[list[int]]:
    """Token ids of each text; UnsupportedInputError unless they hold `n_images` image placeholders in all."""
    from ..errors import UnsupportedInputError

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    token_ids = [list(tok(t)["input_ids"]) for t in texts]
    found = sum(int(i == image_id) for ids in token_ids for i in ids)
    if found != n_images:
        raise UnsupportedInputError(f"{found} image placeholders in the texts but {n_images} images")
    return token_ids


def expand_placeholders(token_ids: list[list[int]], image_id: int, spans: list[list[int]]) -> dict:
    """Each image placeholder (in order, sample after sample) replaced by its span of ids, left-padded with 0.
    -> {input_ids (B, L), attention_mask (B, L)}."""
    queue = iter(spans)
    rows = [[t for i in ids for t in (next(queue) if i == image_id else [i])] for ids in token_ids]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def family_inputs(model, tokenizer, texts: list[str], images: list, image_processor) -> dict:
    """Texts with one image placeholder per image (images in order, sample after sample) -> model inputs,
    through the model's adapter (`prepare_inputs`)."""
    from . import adapter_for

    return adapter_for(model).prepare_inputs(texts, images, tokenizer, image_processor)
