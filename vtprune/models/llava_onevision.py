"""Adapter for `LlavaOnevisionForConditionalGeneration` (LLaVA-OneVision): SigLIP tiles (no [CLS]) + Qwen2 decoder.

An image's placeholders are the packed features of the model's own `pack_image_features`:

- one image in its sample (AnyRes): the base view (side×side, crop 0) followed by the unpadded tile area
  (crop 1) with one `image_newline` after each of its rows; when that area exceeds `anyres_max_9`
  (9 tiles' worth of tokens) the model shrinks it bilinearly first, so the tile-area grid is the shrunk
  h'×w' grid (its tokens are mixtures of neighbouring patches, laid out as a grid all the same);
- several images in a sample (`batch_num_images` > 1): each image is its base view only, plus one newline;
- a video: every frame pooled 2× (⌈side/2⌉² tokens per frame, one crop per frame) and one newline at the end.

Newlines are *structural* rows (kept like text by in-LLM stages, dropped with the image by pre-LLM ones), as
for LLaVA-NeXT. The layout is computed by running `pack_image_features` on a dummy one-channel tensor whose
newline is 1, so it follows the model's code exactly (unpadding, the `anyres_max_N` rule).

Vision signals (spec §7, the no-[CLS] rule as for Qwen2.5-VL): SigLIP has no [CLS] token, so `cls_attention`
is the *column mean* of the feature layer's attention (mean over heads and over the query patches of the same
tile, one softmax per tile), `vision_keys` (n, C) / `vision_head_keys` (n, d_h) that layer's keys (all heads /
head mean). The per-tile maps are packed exactly as the features are, by the model's own
`pack_image_features` (base tile, unpadded tile area, bilinear `anyres_max_N` shrink) and, for videos, its
`apply_pooling` (2× bilinear per frame), so each signal lines up with the candidates. `vision_features` and
`vision_cls_features` do not exist here: the CLIP route of CDPruner and the CLIP variants of VisionZip /
VisPruner fall back to their no-CLIP variants, as on Qwen2.5-VL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..errors import UnsupportedInputError
from .base import ModelAdapter


@dataclass(frozen=True)
class _Layout:
    """One engine image: `kind` image|video, its placeholder count, structural mask and grids."""

    kind: str
    span: int
    cand: torch.Tensor  # (span,) bool: candidate rows (False: newline)
    grids: tuple[tuple[int, int], ...]  # one (h, w) per crop


class LlavaOnevisionAdapter(ModelAdapter):
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    image_kwargs = (
        "pixel_values",
        "image_sizes",
        "pixel_values_videos",
        "image_sizes_videos",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
        "batch_num_images",
    )
    pixel_kwargs = ("pixel_values", "pixel_values_videos")
    layout_kwargs = ("image_sizes", "batch_num_images")
    vision_signal_names = frozenset({"cls_attention", "vision_keys", "vision_head_keys"})

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._layouts: list[_Layout] = []

    @property
    def video_token_id(self) -> int | None:
        v = getattr(self.model.config, "video_token_id", None)
        return None if v is None else int(v)

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        vid = self.video_token_id
        return (self.image_token_id,) if vid is None else (self.image_token_id, vid)

    @property
    def side(self) -> int:
        vc = self.model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    # --- layout ----------------------------------------------------------------------------------
    def _image_layout(self, size, patched: bool) -> _Layout:
        """The packed layout of one image of original `size` (H, W), as `pack_image_features` builds it."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        s = self.side
        size = [int(v) for v in size]
        tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        dummy = torch.zeros(tiles if patched else 1, s * s, 1)
        ratio = getattr(cfg, "vision_aspect_ratio", None) or "anyres_max_9"
        packed, _ = self.model.model.pack_image_features(
            [dummy], [size], image_newline=torch.ones(1), vision_aspect_ratio=ratio
        )
        cand = packed[0][:, 0] != 1
        if not patched:
            return _Layout("image", int(cand.numel()), cand, ((s, s),))
        h = int((~cand).sum())
        w = (int(cand.numel()) - s * s) // h - 1
        return _Layout("image", int(cand.numel()), cand, ((s, s), (h, w)))

    def _video_layout(self, span: int, index: int) -> _Layout:
        p = (self.side + 1) // 2
        frames, rest = divmod(span - 1, p * p)
        if frames < 1 or rest:
            raise UnsupportedInputError(
                f"video {index} has {span} placeholders; LLaVA-OneVision videos have frames·{p}·{p} + 1 (newline)"
            )
        cand = torch.ones(span, dtype=torch.bool)
        cand[-1] = False
        return _Layout("video", span, cand, ((p, p),) * frames)

    def begin_prefill(self, input_ids, mask2d, positions, image_rows, kwargs=None):
        """Cut each sample's placeholder runs into images (in order of `image_sizes`, lengths from their packed
        layouts) and videos (one run each).  -> the refined split."""
        kwargs = kwargs or {}
        sizes = kwargs.get("image_sizes")
        counts = kwargs.get("batch_num_images")
        video_id = self.video_token_id
        sizes = [] if sizes is None else [[int(v) for v in s] for s in sizes]
        # the model patches (AnyRes) every image when batch_num_images is None, else only lone images
        per_image = None if counts is None else [int(c) for c in counts for _ in range(int(c))]
        self._layouts = []
        self._image_meta: tuple[list[list[int]], list[bool]] = ([], [])
        split: list[list[torch.Tensor]] = []
        img = 0
        for b, runs in enumerate(image_rows):
            mine: list[torch.Tensor] = []
            for run in runs:
                if video_id is not None and int(input_ids[b, run[0]]) == video_id:
                    self._layouts.append(self._video_layout(int(run.numel()), len(self._layouts)))
                    mine.append(run)
                    continue
                start = 0
                while start < run.numel():
                    if img >= len(sizes):
                        raise UnsupportedInputError(
                            "LLaVA-OneVision pruning needs image_sizes for every image of the prompt "
                            f"(got {len(sizes)}; the placeholder runs hold more images)"
                        )
                    patched = per_image is None or per_image[img] == 1
                    layout = self._image_layout(sizes[img], patched)
                    if start + layout.span > run.numel():
                        raise UnsupportedInputError(
                            f"image {img} needs {layout.span} placeholders (its packed features) but its run has "
                            f"{int(run.numel()) - start} left"
                        )
                    self._layouts.append(layout)
                    self._image_meta[0].append(sizes[img])
                    self._image_meta[1].append(patched)
                    mine.append(run[start : start + layout.span])
                    start += layout.span
                    img += 1
            split.append(mine)
        if img != len(sizes):
            raise UnsupportedInputError(f"{len(sizes)} image_sizes for {img} images in the prompt")
        return split

    def candidate_mask(self, image_index: int, span: int) -> torch.Tensor:
        layout = self._layouts[image_index]
        if span != layout.span:
            raise UnsupportedInputError(f"image {image_index} has {span} placeholders, expected {layout.span}")
        return layout.cand

    def image_layout(self, image_index: int, n: int):
        grids = list(self._layouts[image_index].grids)
        total = sum(h * w for h, w in grids)
        if n != total:
            raise UnsupportedInputError(f"image {image_index} has {n} visual tokens, expected {total}")
        coords, crop = [], []
        for c, (h, w) in enumerate(grids):
            r = torch.arange(h * w)
            coords.append(torch.stack([r // w, r % w], 1))
            crop.append(torch.full((h * w,), c, dtype=torch.long))
        return grids, torch.cat(coords), torch.cat(crop)

    # --- features --------------------------------------------------------------------------------
    def encode_images(self, kwargs: dict) -> list[torch.Tensor]:
        """Images (packed, newlines included) and videos of the call -> one tensor per engine image."""
        images = videos = None
        common = {k: kwargs[k] for k in ("vision_feature_layer", "vision_feature_select_strategy") if k in kwargs}
        if kwargs.get("pixel_values") is not None:
            if kwargs.get("image_sizes") is None:
                raise UnsupportedInputError("LLaVA-OneVision needs image_sizes alongside pixel_values")
            out = self.model.model.get_image_features(
                kwargs["pixel_values"],
                kwargs["image_sizes"],
                batch_num_images=kwargs.get("batch_num_images"),
                return_dict=True,
                **common,
            )
            images = list(out.pooler_output)
        if kwargs.get("pixel_values_videos") is not None:
            out = self.model.model.get_video_features(kwargs["pixel_values_videos"], return_dict=True, **common)
            videos = list(out.pooler_output)
        return self._per_entry(images, videos)

    def features_from_kwargs(self, kwargs: dict) -> list[torch.Tensor] | None:
        mm = kwargs.get("mm_encoder_outputs") or {}
        images, videos = mm.get("image"), mm.get("video")
        if images is None and videos is None:
            return None
        return self._per_entry(
            None if images is None else list(images.pooler_output),
            None if videos is None else list(videos.pooler_output),
        )

    def _per_entry(self, images: list | None, videos: list | None) -> list[torch.Tensor]:
        want = {k: sum(lay.kind == k for lay in self._layouts) for k in ("image", "video")}
        have = {"image": len(images or ()), "video": len(videos or ())}
        if want != have:
            raise UnsupportedInputError(
                f"the prompt has {want['image']} images and {want['video']} videos but features for "
                f"{have['image']} images and {have['video']} videos were given"
            )
        queues = {"image": iter(images or ()), "video": iter(videos or ())}
        return [next(queues[lay.kind]) for lay in self._layouts]

    def features_to_kwargs(self, feats: list[torch.Tensor]) -> dict:
        """Per engine image -> {"image": [(k_i, D)] per image, "video": (1, Σ k_v, D)} (None if absent)."""
        images = [f for f, lay in zip(feats, self._layouts, strict=True) if lay.kind == "image"]
        videos = [f for f, lay in zip(feats, self._layouts, strict=True) if lay.kind == "video"]
        return {
            "image": BaseModelOutputWithPooling(pooler_output=images) if images else None,
            "video": BaseModelOutputWithPooling(pooler_output=torch.cat(videos)[None]) if videos else None,
        }

    # --- vision signals (spec §7, no [CLS]) ------------------------------------------------------
    def feature_layer(self) -> nn.Module:
        """The SigLIP encoder layer whose output is the feature layer (`hidden_states[vision_feature_layer]`)."""
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedInputError("vision signals need a single vision_feature_layer (got a list)")
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return layers[len(layers) + layer if layer < 0 else layer - 1]

    def vision_attention_module(self) -> nn.Module:
        return self.feature_layer().self_attn

    def vision_signals(self, attn: nn.Module, x: torch.Tensor, kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """Per tile / frame: x (T, s², C) the attention input -> cls_attention (T, s²) column mean over heads and
        query patches (fp32), vision_keys (T, s², C), vision_head_keys (T, s², d_h)."""
        t, n, _ = x.shape
        q = attn.q_proj(x).view(t, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        k_flat = attn.k_proj(x)
        k = k_flat.view(t, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = ((q.float() @ k.float().transpose(-1, -2)) * attn.scale).softmax(-1)  # (T, H, n, n)
        return {
            "cls_attention": probs.mean((1, 2)),
            "vision_keys": k_flat,
            "vision_head_keys": k.mean(1),
        }

    def collate_vision_signals(self, captured: list[dict]) -> list[dict]:
        """Captures in encoding order (all image tiles in one tower call, then all video frames) -> one dict
        of per-engine-image lists, each packed like that image's candidates."""
        if not captured:
            return captured
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        kinds = [k for k in ("image", "video") if any(lay.kind == k for lay in self._layouts)]
        if len(captured) != len(kinds):
            raise UnsupportedInputError(
                f"the vision tower was run {len(captured)} time(s) for {kinds} (beam search / "
                "num_return_sequences with vision-stage methods is unsupported)"
            )
        by_kind = dict(zip(kinds, captured, strict=True))
        ratio = getattr(cfg, "vision_aspect_ratio", None) or "anyres_max_9"
        out: dict[str, list[torch.Tensor]] = {name: [] for name in captured[0]}
        per_kind: dict[str, dict[str, list[torch.Tensor]]] = {}
        if "image" in by_kind:
            sizes, patched = self._image_meta
            tiles = [
                image_size_to_num_patches(sz, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if p else 1
                for sz, p in zip(sizes, patched, strict=True)
            ]
            per_kind["image"] = {}
            for name, value in by_kind["image"].items():
                if int(value.shape[0]) != sum(tiles):
                    raise UnsupportedInputError(
                        f"the vision tower saw {int(value.shape[0])} tiles but the images need {sum(tiles)}"
                    )
                chans = value if value.dim() == 3 else value[..., None]
                packed, _ = self.model.model.pack_image_features(
                    list(chans.split(tiles)), sizes, image_newline=None, vision_aspect_ratio=ratio
                )
                per_kind["image"][name] = [p if value.dim() == 3 else p[:, 0] for p in packed]
        if "video" in by_kind:
            spans = [lay for lay in self._layouts if lay.kind == "video"]
            frames = [len(lay.grids) for lay in spans]
            per_kind["video"] = {}
            for name, value in by_kind["video"].items():
                chans = value if value.dim() == 3 else value[..., None]
                if int(chans.shape[0]) != sum(frames):
                    raise UnsupportedInputError(
                        f"the vision tower saw {int(chans.shape[0])} video frames but the videos have {sum(frames)}"
                    )
                pooled = self.model.model.apply_pooling(chans)  # (frames, p², C)
                per_kind["video"][name] = [
                    (p.flatten(0, 1) if value.dim() == 3 else p.flatten(0, 1)[:, 0]) for p in pooled.split(frames)
                ]
        queues = {k: 0 for k in kinds}
        for lay in self._layouts:
            j = queues[lay.kind]
            queues[lay.kind] += 1
            for name in out:
                out[name].append(per_kind[lay.kind][name][j])
        return [out]

    # --- family facts for applications -------------------------------------------------------------------
    def default_image_processor(self):
        """The PIL LLaVA-OneVision image processor at the tower's tile size with the model's pinpoints."""
        import transformers

        vc = self.model.config.vision_config
        size = vc.image_size if isinstance(vc.image_size, int) else int(vc.image_size[0])
        return transformers.LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=self.model.config.image_grid_pinpoints
        )

    def prepare_inputs(self, texts: list[str], images: list, tokenizer, image_processor, processor=None) -> dict:
        """Each placeholder expanded to the packed feature count of `pack_image_features` (AnyRes for a lone image
        in its sample, the base view for several; newlines included), with `image_sizes` and `batch_num_images`."""
        if not images:
            return super().prepare_inputs(texts, images, tokenizer, image_processor, processor)
        from .family_inputs import expand_placeholders, tokenize_with_images

        image_id = self.image_token_id
        token_ids = tokenize_with_images(tokenizer, texts, image_id, len(images))
        per_sample = [sum(int(i == image_id) for i in ids) for ids in token_ids]
        pix = image_processor(images=images, return_tensors="pt")
        sizes = pix["image_sizes"].tolist()
        patched = [n == 1 for n in per_sample for _ in range(n)]
        spans = [[image_id] * self._image_layout(s, p).span for s, p in zip(sizes, patched, strict=True)]
        out = expand_placeholders(token_ids, image_id, spans)
        out.update(
            pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"], batch_num_images=torch.tensor(per_sample)
        )
        return out

    def synthetic_inputs(self, prompts, image_size=None, seed: int = 0) -> dict:
        """One AnyRes image of `image_size` (W, H) per prompt (default one tile's size: base + 1 tile + newlines)."""
        from . import synthetic

        w, h = image_size or (self.model.config.vision_config.image_size,) * 2
        return synthetic.llava_onevision_inputs(self.model, prompts, [[(h, w)]] * len(prompts), seed=seed)

    def display_layout(self, image, inputs: dict, image_processor):
        """As LLaVA-NeXT (base view | unpadded AnyRes tile area); a grid shrunk by `anyres_max_N` maps each token to
        the block of the unpadded grid it interpolates."""
        from .display import anyres_layout

        size = [int(v) for v in inputs["image_sizes"][0]]
        counts = inputs.get("batch_num_images")
        patched = counts is None or int(counts[0]) == 1
        grids = list(self._image_layout(size, patched).grids)
        return anyres_layout("llava_onevision", self.model.config, image, size, grids)
