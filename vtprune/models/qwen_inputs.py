"""Build Qwen2.5-VL model inputs the way the stock processor does, without torchvision.

`Qwen2_5_VLProcessor` cannot be constructed without torchvision (it insists on a video processor), so
vtprune builds the token ids itself: each image's one `<|image_pad|>` id is expanded to t·h·w/merge²
copies (inside `<|vision_start|> … <|vision_end|>`), plus `mm_token_type_ids` (0 text, 1 image) that
`get_rope_index` needs. Pixels come from the PIL image processor (`Qwen2VLImageProcessorPil`) or any
tensor of flattened patches.

- `expand_image_pads`: token ids with one image id per image (what a tokenizer gives for the chat text)
  -> left-padded model inputs;
- `build_qwen_inputs`: `(prefix ids, suffix ids)` around one image per prompt;
- `qwen_processor_inputs`: texts + PIL images through a tokenizer and the PIL image processor.
"""

from __future__ import annotations

import torch


def image_placeholder_count(config, grid_thw) -> int:
    """LLM tokens of one image: t·h·w / spatial_merge_size²."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // int(config.vision_config.spatial_merge_size) ** 2


def expand_image_pads(config, token_ids: list[list[int]], image_grid_thw: torch.Tensor, pixel_values) -> dict:
    """Prompts whose ids hold one `image_token_id` per image (images in prompt order, sample after sample,
    as `image_grid_thw` lists them) -> each expanded to its placeholder count, left-padded with 0.

    -> {input_ids (B, L), attention_mask (B, L), mm_token_type_ids (B, L), pixel_values, image_grid_thw}.
    """
    image_id = int(config.image_token_id)
    n_pads = sum(int(i == image_id) for ids in token_ids for i in ids)
    if n_pads != image_grid_thw.shape[0]:
        raise ValueError(f"{n_pads} image tokens in the prompts but {image_grid_thw.shape[0]} image grids")
    counts = iter([image_placeholder_count(config, g) for g in image_grid_thw])
    rows, types = [], []
    for ids in token_ids:
        row, tt = [], []
        for i in ids:
            n = next(counts) if i == image_id else 1
            row += [int(i)] * n
            tt += [int(i == image_id)] * n
        rows.append(row)
        types.append(tt)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    mm = torch.zeros_like(ids)
    for b, (r, t) in enumerate(zip(rows, types, strict=True)):
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
        mm[b, width - len(r) :] = torch.tensor(t, dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": mm,
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw.long(),
    }


def build_qwen_inputs(
    config, prompts: list[tuple[list[int], list[int]]], image_grid_thw: torch.Tensor, pixel_values: torch.Tensor
) -> dict:
    """Left-padded ids for prompts `(prefix ids, suffix ids)`, one image each (grids in prompt order).

    -> {input_ids (B, L), attention_mask (B, L), mm_token_type_ids (B, L), pixel_values, image_grid_thw}.
    """
    if len(prompts) != image_grid_thw.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {image_grid_thw.shape[0]} image grids")
    span = [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]
    return expand_image_pads(
        config, [list(pre) + span + list(post) for pre, post in prompts], image_grid_thw, pixel_values
    )


def qwen_processor_inputs(config, tokenizer, texts: list[str], images, image_processor=None) -> dict:
    """What `Qwen2_5_VLProcessor(images=, text=)` returns, without torchvision.

    texts: one string per sample with one `<|image_pad|>` (the tokenizer's token for `image_token_id`) per
    image, e.g. "… <|vision_start|><|image_pad|><|vision_end|> …"; images: the PIL images in that order.
    """
    image_processor = image_processor or qwen_image_processor()
    pix = image_processor(images=images, return_tensors="pt")
    token_ids = [list(tokenizer(t)["input_ids"]) for t in texts]
    return expand_image_pads(config, token_ids, pix["image_grid_thw"], pix["pixel_values"])


def qwen_image_processor(**kwargs):
    """The PIL Qwen2-VL image processor (no torchvision): `(images) -> pixel_values, image_grid_thw`."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)
