"""Model inputs for LLaVA-OneVision, Gemma 3 and InternVL from texts + PIL images, without their processors
(`LlavaOnevisionProcessor` and `InternVLProcessor` need torchvision for their video processors).

Each text holds one image placeholder (the tokenizer's token for `config.image_token_id`) per image; it is
expanded the way the family's processor lays the image out:

- Gemma 3: `<start_of_image>` + `mm_tokens_per_image` soft tokens + `<end_of_image>` per image, and per
  pan-and-scan crop when the image processor made crops (`num_crops`); `token_type_ids` = 1 on soft tokens;
- InternVL: `image_seq_length` · tiles context tokens (tiles = `num_patches` of the image processor: dynamic
  tiles + thumbnail), inside `<img>` … `</img>` when the tokenizer knows those tokens;
- LLaVA-OneVision: the packed feature count of `pack_image_features` (AnyRes for a lone image in its sample,
  the base view for several; newlines included), with `image_sizes` and `batch_num_images`.

`family_inputs(model, tokenizer, texts, images, image_processor)` -> left-padded {input_ids, attention_mask,
pixel_values, …} as the stock forward takes them.
"""

from __future__ import annotations

import torch

FAMILIES = ("llava_onevision", "gemma3", "internvl")


def _token(tokenizer, text: str) -> int | None:
    """The id of a special token the tokenizer knows, else None."""
    tid = tokenizer.convert_tokens_to_ids(text)
    return None if tid is None or tid == tokenizer.unk_token_id else int(tid)


def family_inputs(model, tokenizer, texts: list[str], images: list, image_processor) -> dict:
    """Texts with one image placeholder per image (images in order, sample after sample) -> model inputs."""
    from ..errors import UnsupportedInputError
    from .llava_onevision import LlavaOnevisionAdapter

    cfg = model.config
    kind = cfg.model_type
    image_id = int(cfg.image_token_id)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    token_ids = [list(tok(t)["input_ids"]) for t in texts]
    per_sample = [sum(int(i == image_id) for i in ids) for ids in token_ids]
    if sum(per_sample) != len(images):
        raise UnsupportedInputError(f"{sum(per_sample)} image placeholders in the texts but {len(images)} images")
    out: dict = {}
    if not images:
        spans: list[list[int]] = []
    elif kind == "gemma3":
        pix = image_processor(images=images, return_tensors="pt")
        crops = [int(c) for c in pix.get("num_crops", [0] * len(images))]
        one = [int(cfg.boi_token_index)] + [image_id] * int(cfg.mm_tokens_per_image) + [int(cfg.eoi_token_index)]
        spans = [one * (1 + c) for c in crops]
        out["pixel_values"] = pix["pixel_values"]
    elif kind == "internvl":
        pix = image_processor(images=images, return_tensors="pt")
        tiles = [int(t) for t in pix.get("num_patches", [1] * len(images))]
        start, end = _token(tok, "<img>"), _token(tok, "</img>")
        wrap = (lambda s: [start, *s, end]) if start is not None and end is not None else (lambda s: s)
        spans = [wrap([image_id] * (int(cfg.image_seq_length) * t)) for t in tiles]
        out["pixel_values"] = pix["pixel_values"]
    elif kind == "llava_onevision":
        pix = image_processor(images=images, return_tensors="pt")
        sizes = pix["image_sizes"].tolist()
        patched = [n == 1 for n in per_sample for _ in range(n)]
        adapter = LlavaOnevisionAdapter(model)
        spans = [[image_id] * adapter._image_layout(s, p).span for s, p in zip(sizes, patched, strict=True)]
        out.update(
            pixel_values=pix["pixel_values"],
            image_sizes=pix["image_sizes"],
            batch_num_images=torch.tensor(per_sample),
        )
    else:
        raise UnsupportedInputError(f"family_inputs builds {', '.join(FAMILIES)} inputs, not {kind!r}")
    queue = iter(spans)
    rows = [[t for i in ids for t in (next(queue) if i == image_id else [i])] for ids in token_ids]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
    out = {"input_ids": ids, "attention_mask": mask, **out}
    if kind == "gemma3":
        out["token_type_ids"] = (ids == image_id).long()
    return out
