"""Tiny random models built from configs (real HF classes, no downloads), for tests, demos and docs."""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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


def qwen_inputs(model, prompts: list[tuple[list[int], list[int]]], sizes: list[tuple[int, int]], *, seed: int = 0):
    """Left-padded Qwen2.5-VL inputs, one image of `sizes[b]` = (H, W) px (multiples of 28) per prompt.

    -> {input_ids, attention_mask, mm_token_type_ids (B, L), pixel_values (Σ patches, 1176), image_grid_thw}.
    """
    from .models.qwen_inputs import build_qwen_inputs

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
    from .models.qwen_inputs import expand_vision_pads

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
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels, image_sizes=image_sizes).pooler_output
    rows = [pre + [cfg.image_token_id] * int(f.shape[0]) + post for (pre, post), f in zip(prompts, feats, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": image_sizes}


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


# --- InternVL (hf) -------------------------------------------------------------------------------------
INTERNVL_IMG_START_ID, INTERNVL_IMG_END_ID = 252, 253


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
