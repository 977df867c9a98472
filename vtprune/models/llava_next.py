"""Adapter for `LlavaNextForConditionalGeneration` (LLaVA-NeXT / AnyRes): CLIP per tile + Llama decoder.

An image's placeholders are the packed features of `pack_image_features` (spec §8): the base view
(side×side, crop 0) followed by the unpadded tile area (one grid, crop 1) with one `image_newline`
embedding after each of its rows. Newlines are *structural* rows, never candidates: `llm:k` stages keep
them like text; `pre_llm`/`vision` stages drop all of an image's newlines whenever they prune it
(the engine does this for any adapter whose `candidate_mask` marks structural rows).

The layout comes from `image_sizes` (also when `generate` has consumed it: the engine remembers it as a
`layout_kwargs` entry). Vision [CLS] signals per crop are not implemented for LLaVA-NeXT yet: methods
that request them raise `UnsupportedInputError`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedInputError
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    model_classes = ("LlavaNextForConditionalGeneration",)
    image_kwargs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
    layout_kwargs = ("image_sizes",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._layouts: list[tuple[int, int, int]] = []  # (side, unpadded rows, unpadded cols) per image

    def nominal_visual_tokens(self) -> None:
        return None

    def split_images(self, image_rows: torch.Tensor) -> list[torch.Tensor]:
        return super(LlavaAdapter, self).split_images(image_rows)  # contiguous runs (sizes vary)

    def tile_area(self, image_size) -> tuple[int, int]:
        """(rows, cols) of the unpadded tile grid of one image of `image_size` (H, W), as the model packs it."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        cfg = self.model.config
        side = int(cfg.vision_config.image_size) // int(cfg.vision_config.patch_size)
        size = [int(v) for v in image_size]
        nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        dummy = torch.empty(1, nph * side, npw * side)
        out = unpad_image(dummy, size)
        return int(out.shape[1]), int(out.shape[2])

    def begin_prefill(self, input_ids, mask2d, positions, image_rows, kwargs=None) -> None:
        sizes = (kwargs or {}).get("image_sizes")
        n_images = sum(len(r) for r in image_rows)
        if sizes is None:
            raise UnsupportedInputError("LLaVA-NeXT pruning needs image_sizes to locate the tiles and newlines")
        if len(sizes) != n_images:
            raise UnsupportedInputError(f"{len(sizes)} image_sizes for {n_images} images in the prompt")
        side = self.grid_size[0]
        self._layouts = [(side, *self.tile_area(s)) for s in sizes]
        spans = [int(r.numel()) for rows in image_rows for r in rows]
        for i, ((s, h, w), n) in enumerate(zip(self._layouts, spans, strict=True)):
            if n != s * s + h * (w + 1):
                raise UnsupportedInputError(
                    f"image {i} has {n} placeholders, but its size gives {s}×{s} + {h}×({w}+1) = {s * s + h * (w + 1)}"
                )

    def candidate_mask(self, image_index: int, span: int) -> torch.Tensor:
        s, h, w = self._layouts[image_index]
        tile = torch.ones(h, w + 1, dtype=torch.bool)
        tile[:, w] = False
        return torch.cat([torch.ones(s * s, dtype=torch.bool), tile.flatten()])

    def image_layout(self, image_index: int, n: int):
        s, h, w = self._layouts[image_index]
        if n != s * s + h * w:
            raise UnsupportedInputError(f"image {image_index} has {n} visual tokens, expected {s * s + h * w}")
        rb, rt = torch.arange(s * s), torch.arange(h * w)
        coords = torch.cat([torch.stack([rb // s, rb % s], 1), torch.stack([rt // w, rt % w], 1)])
        crop = torch.cat([torch.zeros(s * s, dtype=torch.long), torch.ones(h * w, dtype=torch.long)])
        return [(s, s), (h, w)], coords, crop

    def vision_attention_module(self) -> nn.Module:
        raise UnsupportedInputError("per-crop vision [CLS] signals are not implemented for LLaVA-NeXT yet")
