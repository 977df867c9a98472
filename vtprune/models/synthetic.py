"""Synthetic inputs of each family: random pixels and prompts with the image placeholders expanded as the family's
processor would, for models built from configs (`arch:` / `tiny:` ids, bench, tests). `vtprune.testing` re-exports
these next to its tiny model factories."""

from __future__ import annotations

import torch

#: InternVL's <img> / </img> ids in the tiny test vocabulary
INTERNVL_IMG_START_ID, INTERNVL_IMG_END_ID = 252, 253

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


def qwen_inputs(model, prompts: list[tuple[list[int], list[int]]], sizes: list[tuple[int, int]], *, seed: int = 0):
    """Left-padded Qwen2.5-VL inputs, one image of `sizes[b]` = (H, W) px (multiples of 28) per prompt.

    -> {input_ids, attention_mask, mm_token_type_ids (B, L), pixel_values (Σ patches, 1176), image_grid_thw}.
    """
    from .qwen_inputs import build_qwen_inputs

    vc = model.config.vision_config
    gen = torch.Generator().manual_seed(seed)
    grids = [(1, h // vc.patch_size, w // vc.patch_size) for h, w in sizes]
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), width, generator=gen).to(model.dtype)
    return build_qwen_inputs(model.config, prompts, torch.tensor(grids), pixels)


def qwen_video_inputs(
    model,
    prompts: list[tuple[list[int], list[int]]],
    media: list[list[tuple[int, ...]]],
    *,
    seed: int = 0,
    second_per_grid_ts: list[float] | None = None,
):
    """Left-padded Qwen2.5-VL inputs with videos (and images): `media[b]` lists prompt b's visual spans in
    order, each `(H, W)` px for an image or `(frames, H, W)` for a video (frames a multiple of
    `temporal_patch_size`; H, W multiples of 28), each inside `<|vision_start|> … <|vision_end|>`.

    -> {input_ids, attention_mask, mm_token_type_ids (B, L) (1 image, 2 video), and for what is present
    pixel_values (Σ patches, 1176), image_grid_thw, pixel_values_videos (Σ patches, 1176), video_grid_thw,
    second_per_grid_ts (n_videos,) if given}.
    """
    from .qwen_inputs import expand_vision_pads

    cfg = model.config
    vc = cfg.vision_config
    gen = torch.Generator().manual_seed(seed)
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    images, videos, token_ids = [], [], []
    for (pre, post), spans in zip(prompts, media, strict=True):
        ids = list(pre)
        for span in spans:
            *frames, h, w = span
            grid = (1 if not frames else frames[0] // vc.temporal_patch_size, h // vc.patch_size, w // vc.patch_size)
            (videos if frames else images).append(grid)
            ids += [cfg.vision_start_token_id, cfg.video_token_id if frames else cfg.image_token_id]
            ids += [cfg.vision_end_token_id]
        token_ids.append(ids + list(post))

    def pixels(grids):
        n = sum(t * h * w for t, h, w in grids)
        return torch.randn(n, width, generator=gen).to(model.dtype) if grids else None

    return expand_vision_pads(
        cfg,
        token_ids,
        torch.tensor(images) if images else None,
        pixels(images),
        torch.tensor(videos) if videos else None,
        pixels(videos),
        second_per_grid_ts,
    )


def llava_next_inputs(model, prompts: list[tuple[list[int], list[int]]], sizes: list[tuple[int, int]], *, seed=0):
    """Left-padded inputs with one image of original size `sizes[b]` = (H, W) per prompt; the placeholder
    count is the model's packed feature count (base + unpadded tiles + newlines)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    s = cfg.vision_config.image_size
    tiles = [image_size_to_num_patches(list(sz), cfg.image_grid_pinpoints, s) for sz in sizes]
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(sizes), max(tiles), 3, s, s, generator=gen)
    image_sizes = torch.tensor(sizes)
    device = next(model.parameters()).device  # the features are counted on the model's device; inputs stay on CPU
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels.to(device), image_sizes=image_sizes.to(device))
        feats = feats.pooler_output
    rows = [pre + [cfg.image_token_id] * int(f.shape[0]) + post for (pre, post), f in zip(prompts, feats, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": image_sizes}


def qwen3_video_inputs(
    model, prompts: list[tuple[list[int], list[int]]], media: list[list[tuple[int, ...]]], *, seed: int = 0
):
    """Left-padded Qwen3-VL inputs with images and videos laid out as its processor does: `media[b]` lists
    prompt b's visual items, `(H, W)` px for an image or `(frames, H, W)` for a video (frames a multiple of
    `temporal_patch_size`; H, W multiples of 32). An image is `<|vision_start|> pads <|vision_end|>`; a video
    is one such run per frame group, each preceded by a timestamp text token (id 30 + group).

    -> {input_ids, attention_mask, mm_token_type_ids (B, L) (1 image, 2 video), pixel_values, image_grid_thw,
    pixel_values_videos, video_grid_thw (the ones present)}.
    """
    cfg = model.config
    vc = cfg.vision_config
    merge = vc.spatial_merge_size
    gen = torch.Generator().manual_seed(seed)
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    images, videos, rows = [], [], []
    for (pre, post), items in zip(prompts, media, strict=True):
        ids, tt = list(pre), [0] * len(pre)
        for item in items:
            *frames, h, w = item
            gh, gw = h // vc.patch_size, w // vc.patch_size
            n = gh * gw // merge**2
            if not frames:
                images.append((1, gh, gw))
                ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
                tt += [0] + [1] * n + [0]
                continue
            groups = frames[0] // vc.temporal_patch_size
            videos.append((groups, gh, gw))
            for g in range(groups):
                ids += [30 + g, cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id]
                tt += [0, 0] + [2] * n + [0]
        rows.append((ids + list(post), tt + [0] * len(post)))
    length = max(len(r) for r, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask, mm = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (r, t) in enumerate(rows):
        ids[b, length - len(r) :] = torch.tensor(r)
        mask[b, length - len(r) :] = 1
        mm[b, length - len(r) :] = torch.tensor(t)
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm}
    for key, grids in (("", images), ("_videos", videos)):
        if grids:
            n = sum(t * h * w for t, h, w in grids)
            out[f"pixel_values{key}"] = torch.randn(n, width, generator=gen).to(model.dtype)
            out["image_grid_thw" if not key else "video_grid_thw"] = torch.tensor(grids)
    return out


def llava_onevision_inputs(
    model,
    prompts: list[tuple[list[int], list[int]]],
    sizes: list[list[tuple[int, int]]],
    *,
    seed: int = 0,
    videos: list[int] | None = None,
) -> dict:
    """Left-padded LLaVA-OneVision inputs: prompt b holds the images of original sizes `sizes[b]` ((H, W) each;
    one image: AnyRes tiles, several: one base tile each, as `batch_num_images` tells the model), then
    `videos[b]` frames of one video (0: none). Placeholder counts are the model's own packed feature counts."""
    cfg = model.config
    s = cfg.vision_config.image_size
    tiles = [image_size_to_num_patches_onevision(model, sz) if len(szs) == 1 else 1 for szs in sizes for sz in szs]
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(tiles), max(tiles), 3, s, s, generator=gen)
    image_sizes = torch.tensor([sz for szs in sizes for sz in szs])
    batch_num_images = torch.tensor([len(szs) for szs in sizes])
    video_frames = videos or [0] * len(prompts)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=pixels, image_sizes=image_sizes, batch_num_images=batch_num_images
        ).pooler_output
    counts = iter(int(f.shape[0]) for f in feats)
    pooled = ((s // cfg.vision_config.patch_size + 1) // 2) ** 2  # tokens per frame after the 2× pooling
    rows = []
    for (pre, post), szs, frames in zip(prompts, sizes, video_frames, strict=True):
        row = list(pre)
        for _ in szs:
            row += [cfg.image_token_id] * next(counts) + [3]
        if frames:
            row += [cfg.video_token_id] * (frames * pooled + 1)
        rows.append(row + list(post))
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_sizes": image_sizes,
        "batch_num_images": batch_num_images,
    }
    if any(video_frames):
        n = [f for f in video_frames if f]
        if len(set(n)) != 1:
            raise ValueError("the videos of one batch must have the same frame count (one pixel tensor)")
        out["pixel_values_videos"] = torch.randn(len(n), n[0], 3, s, s, generator=gen)
    return out


def image_size_to_num_patches_onevision(model, image_size) -> int:
    """Tiles (base + AnyRes grid) LLaVA-OneVision's vision tower sees for one image of `image_size` (H, W)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg = model.config
    return image_size_to_num_patches(list(image_size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)


def gemma3_inputs(model, prompts: list[tuple[list[int], list[int]]], crops: list[int], *, seed: int = 0) -> dict:
    """Left-padded Gemma 3 inputs: prompt b holds `crops[b]` images (e.g. an image and its pan-and-scan crops),
    each `<start_of_image>` + mm_tokens_per_image soft tokens + `<end_of_image>`, as the processor lays them out.

    -> {input_ids, attention_mask, token_type_ids (B, L) (1 on soft tokens), pixel_values (Σ crops, 3, S, S)}.
    """
    cfg = model.config
    n = int(cfg.mm_tokens_per_image)
    span = [cfg.boi_token_index] + [cfg.image_token_id] * n + [cfg.eoi_token_index]
    rows = [list(pre) + span * c + list(post) for (pre, post), c in zip(prompts, crops, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    pixels = torch.randn(sum(crops), 3, size, size, generator=gen).to(model.dtype)
    tt = (ids == cfg.image_token_id).long()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt, "pixel_values": pixels}


def internvl_inputs(model, prompts: list[tuple[list[int], list[int]]], tiles: list[int], *, seed: int = 0) -> dict:
    """Left-padded InternVL inputs: prompt b holds one image of `tiles[b]` tiles (dynamic tiles + thumbnail,
    as the processor cuts them), laid out `<img>` + image_seq_length·tiles `<IMG_CONTEXT>` + `</img>`.

    -> {input_ids, attention_mask, pixel_values (Σ tiles, 3, S, S)}."""
    cfg = model.config
    n = int(cfg.image_seq_length)
    rows = [
        list(pre) + [INTERNVL_IMG_START_ID] + [cfg.image_token_id] * (n * t) + [INTERNVL_IMG_END_ID] + list(post)
        for (pre, post), t in zip(prompts, tiles, strict=True)
    ]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    gen = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    side = size[0] if isinstance(size, (list, tuple)) else size
    pixels = torch.randn(sum(tiles), 3, side, side, generator=gen).to(model.dtype)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
