"""Adapter for `InternVLForConditionalGeneration` (the `-hf` InternVL checkpoints): InternViT per 448 px tile,
pixel shuffle 0.5 (2×2 patches -> one token: 256 tokens per tile), MLP projector, Qwen2 / Llama decoder.

- Layout: an image is one `<img>` … `</img>` run of `image_seq_length`·T placeholders, T its tiles (the dynamic
  tiles, then the thumbnail when T > 1), in the order of `pixel_values`. Each tile is one crop with its own
  16×16 grid (crop t = tile t; the thumbnail is the last crop). The tiles' arrangement in the original image
  is not part of the model inputs, so coordinates are per tile.
- Vision signals: InternViT has a [CLS] token (dropped by `vision_feature_select_strategy="default"`), so
  per tile `cls_attention` is its [CLS] row's attention over the tile's patches at the feature layer (head
  mean), `vision_keys` / `vision_head_keys` that layer's keys; each averaged over the 2×2 patches that the
  pixel shuffle merges into one token (the model's own `pixel_shuffle` applied to the maps), so they line
  up with the candidates.
- Inputs: the prompt's `<IMG_CONTEXT>` runs (contiguous per image) give the images; pixel rows are consumed in
  that order (T = run length / image_seq_length).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import UnsupportedInputError
from .base import ModelAdapter


class InternVLAdapter(ModelAdapter):
    model_classes = ("InternVLForConditionalGeneration",)
    model_types = ("internvl",)
    image_kwargs = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy")
    vision_signal_names = frozenset({"cls_attention", "vision_keys", "vision_head_keys"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._tiles: list[int] = []

    @property
    def per_tile(self) -> int:
        return int(self.model.config.image_seq_length)

    @property
    def side(self) -> int:
        return int(round(self.per_tile**0.5))

    def begin_prefill(self, input_ids, mask2d, positions, image_rows, kwargs=None):
        self._tiles = []
        for runs in image_rows:
            for run in runs:
                t, rest = divmod(int(run.numel()), self.per_tile)
                if t < 1 or rest:
                    raise UnsupportedInputError(
                        f"an image run of {run.numel()} placeholders is not a multiple of the {self.per_tile} "
                        "tokens per InternVL tile"
                    )
                self._tiles.append(t)
        return None

    def image_layout(self, image_index: int, n: int):
        t, s = self._tiles[image_index], self.side
        if n != t * s * s:
            raise UnsupportedInputError(f"image {image_index} has {n} visual tokens, expected {t}×{s}×{s}")
        r = torch.arange(s * s)
        coords = torch.stack([r // s, r % s], 1).repeat(t, 1)
        crop = torch.arange(t).repeat_interleave(s * s)
        return [(s, s)] * t, coords, crop

    def image_tiles(self, image_index: int) -> torch.Tensor:
        """(n,) the InternViT tile of each candidate (tiles in `pixel_values` order, thumbnail last)."""
        return torch.arange(self._tiles[image_index]).repeat_interleave(self.per_tile)

    def encode_images(self, kwargs: dict) -> list[torch.Tensor]:
        extra = {k: kwargs[k] for k in self.image_kwargs[1:] if kwargs.get(k) is not None}
        out = self.model.model.get_image_features(pixel_values=kwargs["pixel_values"], return_dict=True, **extra)
        return self._per_image(out.pooler_output)

    def features_from_kwargs(self, kwargs: dict) -> list[torch.Tensor] | None:
        mm = kwargs.get("mm_encoder_outputs") or {}
        out = mm.get("image")
        return None if out is None else self._per_image(out.pooler_output)

    def _per_image(self, tiles) -> list[torch.Tensor]:
        """(Σ T, per_tile, D) per tile (or already flat) -> [(T_i·per_tile, D)] per image."""
        flat = torch.cat(list(tiles)) if not torch.is_tensor(tiles) or tiles.dim() == 3 else tiles
        if int(flat.shape[0]) != self.per_tile * sum(self._tiles):
            raise UnsupportedInputError(
                f"the images give {int(flat.shape[0])} visual tokens but the prompt's runs need "
                f"{self.per_tile}·{sum(self._tiles)}"
            )
        return list(flat.split([self.per_tile * t for t in self._tiles]))

    def features_to_kwargs(self, feats: list[torch.Tensor]) -> dict:
        """(k_i, D) per image -> one (1, Σ k_i, D) tensor (the model scatters it in placeholder order)."""
        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(feats)[None])}

    # --- vision signals --------------------------------------------------------------------------
    def vision_attention_module(self) -> nn.Module:
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedInputError("vision signals need a single vision_feature_layer (got a list)")
        layers = self.model.model.vision_tower.encoder.layer
        return layers[len(layers) + layer if layer < 0 else layer - 1].attention

    def vision_signals(self, attn: nn.Module, x: torch.Tensor, kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """x (T, 1 + P², C) the feature layer's attention input, per tile -> cls_attention (T, n) fp32,
        vision_keys (T, n, C), vision_head_keys (T, n, d_h), n = P²/4 tokens after the pixel shuffle."""
        if self.model.config.vision_feature_select_strategy != "default":
            raise UnsupportedInputError("InternVL vision signals need vision_feature_select_strategy='default'")
        t, length, _ = x.shape
        q = attn.q_norm(attn.q_proj(x[:, :1])).view(t, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k_flat = attn.k_norm(attn.k_proj(x))
        k = k_flat.view(t, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1)[:, :, 0, 1:].mean(1)
        return {
            "cls_attention": self._shuffle_mean(probs[..., None])[..., 0],
            "vision_keys": self._shuffle_mean(k_flat[:, 1:]),
            "vision_head_keys": self._shuffle_mean(k.mean(1)[:, 1:]),
        }

    def _shuffle_mean(self, v: torch.Tensor) -> torch.Tensor:
        """(T, P², c) per patch -> (T, P²/4, c): the mean over the patches the model's pixel shuffle merges."""
        t, n, c = v.shape
        side = int(round(n**0.5))
        ratio = float(self.model.config.downsample_ratio)
        out = self.model.model.pixel_shuffle(v.reshape(t, side, side, c).contiguous(), scale_factor=ratio)
        merged = int(round(1 / ratio**2))
        return out.reshape(t, -1, merged, c).mean(2)

    def collate_vision_signals(self, captured: list[dict]) -> list[dict]:
        """Per-tile captures -> per image (its tiles' tokens concatenated, tile order)."""
        if not captured:
            return captured
        names = list(captured[0])
        tiles = {name: torch.cat([c[name] for c in captured]) for name in names}
        if any(int(v.shape[0]) != sum(self._tiles) for v in tiles.values()):
            raise UnsupportedInputError(
                f"the vision tower saw {int(next(iter(tiles.values())).shape[0])} tiles but the prompt has "
                f"{sum(self._tiles)} (beam search / num_return_sequences with vision-stage methods is unsupported)"
            )
        return [{name: [p.flatten(0, 1) for p in v.split(self._tiles)] for name, v in tiles.items()}]

    # --- family facts for applications -------------------------------------------------------------------
    def default_image_processor(self):
        """The PIL GotOcr2 (InternVL) image processor at the tower's tile size, dynamic tiles on."""
        import transformers

        vc = self.model.config.vision_config
        size = vc.image_size if isinstance(vc.image_size, int) else int(vc.image_size[0])
        return transformers.GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True)

    def prepare_inputs(self, texts: list[str], images: list, tokenizer, image_processor, processor=None) -> dict:
        """`image_seq_length` · tiles context tokens per image (tiles = the image processor's `num_patches`: dynamic
        tiles + thumbnail), inside `<img>` … `</img>` when the tokenizer knows those tokens."""
        if not images:
            return super().prepare_inputs(texts, images, tokenizer, image_processor, processor)
        from .family_inputs import expand_placeholders, special_token, tokenize_with_images

        image_id = self.image_token_id
        token_ids = tokenize_with_images(tokenizer, texts, image_id, len(images))
        pix = image_processor(images=images, return_tensors="pt")
        tiles = [int(t) for t in pix.get("num_patches", [1] * len(images))]
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        start, end = special_token(tok, "<img>"), special_token(tok, "</img>")
        wrap = (lambda s: [start, *s, end]) if start is not None and end is not None else (lambda s: s)
        out = expand_placeholders(token_ids, image_id, [wrap([image_id] * (self.per_tile * t)) for t in tiles])
        out["pixel_values"] = pix["pixel_values"]
        return out

    def synthetic_inputs(self, prompts, image_size=None, seed: int = 0) -> dict:
        """One tile (no thumbnail) per prompt: `image_seq_length` (256) tokens."""
        from . import synthetic

        return synthetic.internvl_inputs(self.model, prompts, [1] * len(prompts), seed=seed)

    def display_layout(self, image, inputs: dict, image_processor):
        """Each dynamic tile's side×side grid at its place on the image, then the thumbnail over the whole image:
        views "tiles" | "thumbnail", several crops drawn on one view."""
        from .display import Layout, original_view

        side = self.side
        view = original_view(image)
        w_img, h_img = view.width, view.height
        cols, rows, thumb = internvl_canvas(image_processor, (h_img, w_img))
        tiles = cols * rows
        n_crops = tiles + int(thumb)
        got = int(inputs["pixel_values"].shape[0])
        if got != n_crops:
            raise UnsupportedInputError(
                f"InternVL show: the processor made {got} tiles but its {cols}×{rows} canvas (+ thumbnail) gives "
                f"{n_crops}; pass the image processor that made the inputs"
            )
        tw, th = w_img / cols, h_img / rows

        def box(crop: int, r: int, c: int):
            if crop == tiles:  # the thumbnail: the whole image
                cw, ch = w_img / side, h_img / side
                return c * cw, r * ch, (c + 1) * cw, (r + 1) * ch
            ox, oy = (crop % cols) * tw, (crop // cols) * th
            cw, ch = tw / side, th / side
            return ox + c * cw, oy + r * ch, ox + (c + 1) * cw, oy + (r + 1) * ch

        views, names = [view], [f"tiles ({cols}x{rows})"]
        if thumb:
            views.append(view)
            names.append("thumbnail")
        return Layout("internvl", [(side, side)] * n_crops, views, names, box, [0] * tiles + [1] * int(thumb))


def internvl_canvas(image_processor, image_size) -> tuple[int, int, bool]:
    """InternVL processor (GotOcr2) tiling of an image of `image_size` (H, W) -> (cols, rows, thumbnail)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    if not getattr(image_processor, "crop_to_patches", False):
        return 1, 1, False
    size = image_processor.size
    tile = (int(size["height"]), int(size["width"])) if isinstance(size, dict) else (size.height, size.width)
    lo, hi = int(image_processor.min_patches), int(image_processor.max_patches)
    cols, rows = get_optimal_tiled_canvas(tuple(int(v) for v in image_size), tile, lo, hi)
    return int(cols), int(rows), cols * rows != 1
