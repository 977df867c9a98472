"""Build Qwen2.5-VL model inputs the way the stock processor does, without torchvision.

`Qwen2_5_VLProcessor` cannot be constructed without torchvision (it insists on a video processor), so
vtprune builds the token ids itself: each image's one `<|image_pad|>` id is expanded to t·h·w/merge²
copies (inside `<|vision_start|> … <|vision_end|>`), plus `mm_token_type_ids` (0 text, 1 image) that
`get_rope_index` needs. Pixels come from the PIL image processor (`Qwen2VLImageProcessorPil`) or any
tensor of flattened patches.

- `expand_image_pads`: token ids with one image id per image (what a tokenizer gives for the chat text)
  -> left-padded model inputs; `expand_vision_pads` the same with videos (one video id per video, type 2);
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
    return expand_vision_pads(config, token_ids, image_grid_thw, pixel_values)


def expand_vision_pads(
    config,
    token_ids: list[list[int]],
    image_grid_thw: torch.Tensor | None = None,
    pixel_values=None,
    video_grid_thw: torch.Tensor | None = None,
    pixel_values_videos=None,
    second_per_grid_ts=None,
) -> dict:
    """Like `expand_image_pads`, with videos too: each `video_token_id` (one per video, videos in prompt
    order as `video_grid_thw` lists them) becomes t·h·w/merge² placeholders of type 2.

    -> {input_ids, attention_mask, mm_token_type_ids (B, L) (0 text, 1 image, 2 video)} plus the image
    keys (pixel_values, image_grid_thw) and video keys (pixel_values_videos, video_grid_thw,
    second_per_grid_ts) that are given.
    """
    image_id = int(config.image_token_id)
    video_id = getattr(config, "video_token_id", None)
    grids = {image_id: image_grid_thw, video_id: video_grid_thw}
    counts, types = {}, {image_id: 1, video_id: 2}
    for tok, grid, name in ((image_id, image_grid_thw, "image"), (video_id, video_grid_thw, "video")):
        n_pads = sum(int(i == tok) for ids in token_ids for i in ids) if tok is not None else 0
        n_grids = 0 if grid is None else int(grid.shape[0])
        if n_pads != n_grids:
            raise ValueError(f"{n_pads} {name} tokens in the prompts but {n_grids} {name} grids")
        counts[tok] = iter([image_placeholder_count(config, g) for g in grids[tok]] if n_grids else [])
    rows, kinds = [], []
    for ids in token_ids:
        row, tt = [], []
        for i in ids:
            n = next(counts[i]) if i in counts else 1
            row += [int(i)] * n
            tt += [types.get(i, 0)] * n
        rows.append(row)
        kinds.append(tt)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    mm = torch.zeros_like(ids)
    for b, (r, t) in enumerate(zip(rows, kinds, strict=True)):
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
        mm[b, width - len(r) :] = torch.tensor(t, dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm}
    if image_grid_thw is not None:
        out.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw.long())
    if video_grid_thw is not None:
        out.update(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw.long())
        if second_per_grid_ts is not None:
            out["second_per_grid_ts"] = torch.as_tensor(second_per_grid_ts, dtype=torch.float32)
    return out


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
