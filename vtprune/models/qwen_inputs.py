"""Build Qwen2.5-VL model inputs the way the stock processor does, without torchvision.

`Qwen2_5_VLProcessor` cannot be constructed without torchvision (it insists on a video processor), so
vtprune builds the token ids itself: `<|vision_start|> <|image_pad|>×(t·h·w/merge²) <|vision_end|>` per
image, plus `mm_token_type_ids` (0 text, 1 image) that `get_rope_index` needs. Pixels come from the PIL
image processor (`Qwen2VLImageProcessorPil`) or any tensor of flattened patches.
"""

from __future__ import annotations

import torch


def image_placeholder_count(config, grid_thw) -> int:
    """LLM tokens of one image: t·h·w / spatial_merge_size²."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // int(config.vision_config.spatial_merge_size) ** 2


def build_qwen_inputs(
    config, prompts: list[tuple[list[int], list[int]]], image_grid_thw: torch.Tensor, pixel_values: torch.Tensor
) -> dict:
    """Left-padded ids for prompts `(prefix ids, suffix ids)`, one image each (grids in prompt order).

    -> {input_ids (B, L), attention_mask (B, L), mm_token_type_ids (B, L), pixel_values, image_grid_thw}.
    """
    if len(prompts) != image_grid_thw.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {image_grid_thw.shape[0]} image grids")
    rows, types = [], []
    for (pre, post), grid in zip(prompts, image_grid_thw, strict=True):
        n = image_placeholder_count(config, grid)
        span = [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
        rows.append(list(pre) + span + list(post))
        types.append([0] * (len(pre) + 1) + [1] * n + [0] * (1 + len(post)))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    tt = torch.zeros_like(ids)
    for b, (r, t) in enumerate(zip(rows, types, strict=True)):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
        tt[b, width - len(r) :] = torch.tensor(t)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": tt,
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw.long(),
    }


def qwen_image_processor(**kwargs):
    """The PIL Qwen2-VL image processor (no torchvision): `(images) -> pixel_values, image_grid_thw`."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)
