"""Adapter for `LlavaNextForConditionalGeneration` (LLaVA-NeXT / AnyRes): CLIP per tile + Llama decoder.

An image's placeholders are the packed features of `pack_image_features` (spec §8): the base view
(side×side, crop 0) followed by the unpadded tile area (one grid, crop 1) with one `image_newline`
embedding after each of its rows. Newlines are *structural* rows, never candidates: `llm:k` stages keep
them like text; `pre_llm`/`vision` stages drop all of an image's newlines whenever they prune it
(the engine does this for any adapter whose `candidate_mask` marks structural rows).

The layout comes from `image_sizes` (also when `generate` has consumed it: the engine remembers it as a
`layout_kwargs` entry).

Vision signals (spec §8, "per-crop methods use that crop's own [CLS] row and keys"): the pre-hook on the
CLIP feature layer's attention sees every tile of every image, (n_tiles_total, 1 + side², C); each tile's
[CLS] row attends over its own side² patches (`vision_signals`, per tile). At the prefill,
`collate_vision_signals` splits the tiles per image and re-packs them with the model's own
`pack_image_features` (no newline): base tile first, then the unpadded tile area in packed raster order,
so `cls_attention` (n,) and `vision_keys` (n, C) line up with the image's candidate tokens.
`vision_cls_features` (from a forward hook on the feature layer: its output's [CLS] row per tile) stays one
row per tile, (n_tiles, C), row v = view v of `image_tiles` (0 base, 1 + t tile t).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import hf_compat as hf
from ..contract.signals import VIEW_SIGNALS
from ..errors import UnsupportedInputError
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    model_classes = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)
    processor_class = "LlavaNextProcessor"
    image_kwargs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
    layout_kwargs = ("image_sizes",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._layouts: list[tuple[int, int, int]] = []  # (side, unpadded rows, unpadded cols) per image
        self._sizes: list[list[int]] = []  # (H, W) per image, as `image_sizes` gave them

    def nominal_visual_tokens(self) -> None:
        return None

    def split_images(self, image_rows: torch.Tensor) -> list[torch.Tensor]:
        return super(LlavaAdapter, self).split_images(image_rows)  # contiguous runs (sizes vary)

    def tile_area(self, image_size) -> tuple[int, int]:
        """(rows, cols) of the unpadded tile grid of one image of `image_size` (H, W), as the model packs it."""
        get_anyres_image_grid_shape, unpad_image, _ = hf.llava_next_tiling()
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
        self._sizes = [[int(v) for v in s] for s in sizes]
        self._tiles: list[torch.Tensor] | None = None
        self._layouts = [(side, *self.tile_area(s)) for s in self._sizes]
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

    def image_tiles(self, image_index: int) -> torch.Tensor:
        """0 for the base view, 1 + t for candidates from anyres tile t (packed raster order, unpadded)."""
        if self._tiles is None:
            side = self.grid_size[0]
            self._tiles = [idx // (side * side) for idx in self.packed_tile_index()]
        return self._tiles[image_index]

    # --- vision signals (spec §8) ----------------------------------------------------------------
    def vision_signals(self, attn: nn.Module, x: torch.Tensor, kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """Per *tile*: x (n_tiles_total, 1 + side², C) -> cls_attention (n_tiles, side²), vision_keys
        (n_tiles, side², C), each tile's own [CLS] row and keys; `collate_vision_signals` maps them to images."""
        if self.model.config.vision_feature_select_strategy != "default":
            raise UnsupportedInputError("LLaVA-NeXT vision signals need vision_feature_select_strategy='default'")
        return super().vision_signals(attn, x, kwargs)

    def tile_counts(self) -> list[int]:
        """Tiles each image of this prefill sends through CLIP (base + anyres grid), as `get_image_features`."""
        image_size_to_num_patches = hf.llava_next_tiling()[2]
        cfg = self.model.config
        tile = cfg.vision_config.image_size
        return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, tile) for s in self._sizes]

    def packed_tile_index(self) -> list[torch.Tensor]:
        """Per image: (n,) indices into its tiles' flattened (n_tiles · side²) patches, in candidate order
        (base tile, then the unpadded tile area in packed raster order; newlines excluded)."""
        side = self.grid_size[0]
        per_image = [torch.arange(t * side * side).view(t, side * side, 1) for t in self.tile_counts()]
        packed, _ = self.model.model.pack_image_features(per_image, self._sizes, "default", image_newline=None)
        return [p[:, 0] for p in packed]

    def collate_vision_signals(self, captured: list[dict]) -> list[dict]:
        """Per-tile captures of one encoding -> [{cls_attention: [(n_i,)], vision_keys: [(n_i, C)], …,
        vision_cls_features: [(tiles_i, C)]}]."""
        if not captured:
            return captured
        names = list(dict.fromkeys(n for c in captured for n in c))  # attention and projector captures
        tiles = {name: torch.cat([c[name] for c in captured if name in c]) for name in names}
        counts = self.tile_counts()
        got = max(int(t.shape[0]) for t in tiles.values())
        if any(int(t.shape[0]) != got for t in tiles.values()) or got != sum(counts):
            raise UnsupportedInputError(
                f"the vision tower saw {got} tiles but the image_sizes of this prompt give {sum(counts)} "
                "(beam search / num_return_sequences with vision-stage methods is unsupported)"
            )
        index = self.packed_tile_index()
        out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for name, t in tiles.items():
            for part, idx in zip(t.split(counts), index, strict=True):
                if name in VIEW_SIGNALS:  # one row per tile (view id = tile index, base first)
                    out[name].append(part.flatten(0, 1))
                else:
                    out[name].append(part.flatten(0, 1)[idx.to(part.device)])
        n = [s * s + h * w for s, h, w in self._layouts]
        for name in set(names) - VIEW_SIGNALS:
            if [int(t.shape[0]) for t in out[name]] != n:
                raise UnsupportedInputError(f"re-packed vision signals do not match the candidate counts {n}")
        return [out]

    # --- family facts for applications -------------------------------------------------------------------
    def default_image_processor(self):
        """CLIP preprocessing per tile with the model's AnyRes pinpoints."""
        from transformers import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(
            image_grid_pinpoints=self.model.config.image_grid_pinpoints, **self._clip_processor_kwargs()
        )

    def synthetic_inputs(self, prompts, image_size=None, seed: int = 0) -> dict:
        """One image of `image_size` (W, H) per prompt; default 2×2 tiles' worth."""
        from . import synthetic

        w, h = image_size or (2 * self.model.config.vision_config.image_size,) * 2
        return synthetic.llava_next_inputs(self.model, prompts, [(h, w)] * len(prompts), seed=seed)

    def display_layout(self, image, inputs: dict, image_processor):
        """Base view (side×side over the whole image) and the unpadded tile grid mapped onto the image."""
        from .display import anyres_layout, anyres_tile_geometry

        size = [int(v) for v in inputs["image_sizes"][0]]
        geo = anyres_tile_geometry(self.model.config, size)
        s = geo["side"]
        return anyres_layout("llava_next", self.model.config, image, size, [(s, s), (geo["rows"], geo["cols"])])
