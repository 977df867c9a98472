"""Adapter for `Qwen2_5_VLForConditionalGeneration`: windowed ViT + 2×2 merger, Qwen2 decoder with M-RoPE.

- Positions: 3-D M-RoPE ids `(3, B, L)` from the model's own `get_rope_index` on the *unpruned* input (or
  the 4-row ids `generate` builds, whose text row is dropped); the engine gathers them for kept rows and
  decodes from max(original id) + 1 + t (spec §6), as the stock model's `rope_deltas` do.  For video the
  largest id may be a temporal id (`second_per_grid_ts` · `tokens_per_second` spacing) above the last
  prompt id; stock 5.23 `generate` then continues from last prompt id + 1 (its `position_ids[..., -1:] + 1`
  rule) while its `rope_deltas` decode continues from max + 1: pruned runs follow the latter, bypassed runs
  (budget >= N) stay bit-identical to stock.
- `reindex` (spec §6): kept image tokens keep their gathered 3-D ids (grid coordinates), text is
  renumbered contiguously and resumes after max(kept image ids) + 1 (for video: max of the kept tokens'
  (h, w) ids + 1, the stock rule that ignores the temporal extent; decoding continues after max(all
  kept ids) + 1).
- Grids: each image is one crop whose (row, col) coordinates are read back from the 3-D ids, so they are
  available even when `generate` has already consumed `image_grid_thw`.
- Video (spec §7 "treat each temporal group as an image"): `video_token_id` rows are visual candidates.
  A video's span is cut into its temporal groups (t index of the merged grid; one group =
  `temporal_patch_size` frames), each an "image" for the engine: budgets (largest-remainder split over
  all images and groups of a sample), seeds, (row, col) coordinates, vision signals and selection.
  Pruned video features go back as `mm_encoder_outputs["video"]` (one tensor per video, groups
  concatenated). Images and videos may be mixed in one prompt and in one batch; in-LLM (`llm:k`) stages
  treat video rows like image rows. Each group keeps its original 3-D ids, so decoding continues after
  max(original ids) + 1 + t.
- Vision signals without [CLS] (spec §7): the last full-attention ViT block's attention, recomputed per
  image / temporal group (the ViT's own full-attention segments) in chunks of query rows; `cls_attention`
  = column mean over heads and query patches, averaged over each 2×2 merge group; `vision_keys` = the
  block's *pre-RoPE* keys, all heads (n, C) like the LLaVA adapter's (a method splits heads / takes the
  spec's head mean itself), averaged the same way; both un-permuted from window order to the merger's
  raster order. Captures are matched to images / videos by encoding order (images first, as both
  `generate` and the engine encode them).
- Bad input (`UnsupportedInputError`): placeholder spans that do not form the grids the positions
  describe (e.g. video tokens without `mm_token_type_ids` = 2 in `generate`), image / video feature counts
  that do not match the placeholders, missing `image_grid_thw` / `video_grid_thw`.
- Sliding-window decoder layers (`use_sliding_window=True`, off in every released Qwen2.5-VL) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .. import hf_compat as hf
from ..errors import UnsupportedInputError
from .base import ModelAdapter, RotarySpec


@dataclass(frozen=True)
class _Entry:
    """One engine "image": a whole image, or one temporal group of a video."""

    kind: str  # "image" | "video"
    source: int  # index of the image / video in the batch (order of `*_grid_thw` and of the features)
    group: int  # temporal group inside the video (0 for images)
    groups: int  # temporal groups of the source (1 for images)
    grid: tuple[int, int]  # merged (h, w)


class Qwen2_5_VLAdapter(ModelAdapter):
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)
    placeholder_tokens = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    vision_signal_names = frozenset({"cls_attention", "vision_keys", "vision_head_keys"})
    dynamic_resolution = True
    position_rows = 3
    # popped once pruned features are passed as `mm_encoder_outputs` with explicit positions (notes P8)
    image_kwargs = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
        "mm_token_type_ids",
    )
    pixel_kwargs = ("pixel_values", "pixel_values_videos")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if any(t != "full_attention" for t in getattr(self.text_config, "layer_types", None) or ()):
            raise UnsupportedInputError("Qwen2.5-VL with sliding-window decoder layers is not supported by vtprune")
        self._entries: list[_Entry] = []
        self._grid_thw: torch.Tensor | None = None

    # --- images and videos -----------------------------------------------------------------------
    @property
    def merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def video_token_id(self) -> int | None:
        v = getattr(self.model.config, "video_token_id", None)
        return None if v is None else int(v)

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        vid = self.video_token_id
        return (self.image_token_id,) if vid is None else (self.image_token_id, vid)

    def encode_images(self, kwargs: dict) -> list[torch.Tensor]:
        """Images and videos of the call -> features per engine image (video: per temporal group)."""
        images = videos = None
        if kwargs.get("pixel_values") is not None:
            grid = kwargs.get("image_grid_thw")
            if grid is None:
                raise UnsupportedInputError("Qwen2.5-VL needs image_grid_thw alongside pixel_values")
            images = list(
                self.model.model.get_image_features(kwargs["pixel_values"], grid, return_dict=True).pooler_output
            )
        if kwargs.get("pixel_values_videos") is not None:
            grid = kwargs.get("video_grid_thw")
            if grid is None:
                raise UnsupportedInputError("Qwen2.5-VL needs video_grid_thw alongside pixel_values_videos")
            out = self.model.model.get_video_features(kwargs["pixel_values_videos"], grid, return_dict=True)
            videos = list(out.pooler_output)
        return self._per_entry(images, videos, "features")

    def features_from_kwargs(self, kwargs: dict) -> list[torch.Tensor] | None:
        mm = kwargs.get("mm_encoder_outputs") or {}
        images, videos = mm.get("image"), mm.get("video")
        if images is None and videos is None:
            return None
        return self._per_entry(
            None if images is None else list(images.pooler_output),
            None if videos is None else list(videos.pooler_output),
            "features",
        )

    def features_to_kwargs(self, feats: list[torch.Tensor]) -> dict:
        """Per engine image -> {"image": [(k_i, D)] per image, "video": [(Σ_g k_g, D)] per video} (None if absent)."""
        images = [f for f, e in zip(feats, self._entries, strict=True) if e.kind == "image"]
        videos: dict[int, list[torch.Tensor]] = {}
        for f, e in zip(feats, self._entries, strict=True):
            if e.kind == "video":
                videos.setdefault(e.source, []).append(f)
        return {
            "image": BaseModelOutputWithPooling(pooler_output=images) if images else None,
            "video": BaseModelOutputWithPooling(pooler_output=[torch.cat(v) for v in videos.values()])
            if videos
            else None,
        }

    def _per_entry(self, images: list | None, videos: list | None, what: str) -> list:
        """Per-image / per-video tensors (n_src, ...) -> one per engine image, videos cut into their groups."""
        have = {"image": 0 if images is None else len(images), "video": 0 if videos is None else len(videos)}
        want = {k: len({e.source for e in self._entries if e.kind == k}) for k in ("image", "video")}
        if have != want:
            raise UnsupportedInputError(
                f"the prompt has {want['image']} image and {want['video']} video placeholder spans but "
                f"{what} for {have['image']} images and {have['video']} videos were given"
            )
        out = []
        for e in self._entries:
            if e.kind == "image":
                out.append(images[e.source])
                continue
            full = videos[e.source]
            if int(full.shape[0]) % e.groups:
                raise UnsupportedInputError(
                    f"video {e.source} gives {int(full.shape[0])} visual tokens, not a multiple of its {e.groups} "
                    f"temporal groups of {e.grid[0]}×{e.grid[1]} placeholders"
                )
            out.append(full.chunk(e.groups)[e.group] if e.groups > 1 else full)
        return out

    def begin_prefill(self, input_ids, mask2d, positions, images_rows: list[list[torch.Tensor]], kwargs=None):
        """Cut each sample's placeholder runs into images and video temporal groups, with their merged grids
        read from the original 3-D ids.  -> the refined split (per sample, row indices per engine image)."""
        self._entries = []
        video_id = self.video_token_id
        sources = {"image": 0, "video": 0}
        split: list[list[torch.Tensor]] = []
        for b, runs in enumerate(images_rows):
            mine: list[torch.Tensor] = []
            for run in runs:
                ids = input_ids[b, run]
                cuts = ((ids[1:] != ids[:-1]).nonzero().flatten() + 1).tolist()  # image ↔ video boundaries
                for rows in torch.tensor_split(run, cuts):
                    kind = "video" if video_id is not None and int(input_ids[b, rows[0]]) == video_id else "image"
                    h, w, groups = _grid_of(kind, positions[:, b, rows])
                    for g, part in enumerate(rows.split(h * w)):
                        self._entries.append(_Entry(kind, sources[kind], g, groups, (h, w)))
                        mine.append(part)
                    sources[kind] += 1
            split.append(mine)
        return split

    def image_layout(self, image_index: int, n: int):
        h, w = self._entries[image_index].grid
        if n != h * w:
            raise UnsupportedInputError(f"image {image_index} has {n} visual tokens, expected {h}×{w} = {h * w}")
        r = torch.arange(n)
        return [(h, w)], torch.stack([r // w, r % w], 1), torch.zeros(n, dtype=torch.long)

    # --- positions -------------------------------------------------------------------------------
    def original_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kwargs: dict):
        given = kwargs.get("position_ids")
        if given is not None and given.shape[-1] == input_ids.shape[1]:
            if given.dim() == 3 and given.shape[0] == 4:  # generate's [text; t; h; w] ids
                return given[1:]
            if given.dim() == 3 and given.shape[0] == 3:
                return given
            if given.dim() == 2:
                return given[None].expand(3, -1, -1)
        image_grid, video_grid = kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw")
        video_id = self.video_token_id
        has_image = bool((input_ids == self.image_token_id).any())
        has_video = video_id is not None and bool((input_ids == video_id).any())
        if (has_image and image_grid is None) or (has_video and video_grid is None):
            raise UnsupportedInputError(
                "Qwen2.5-VL needs image_grid_thw / video_grid_thw for its image / video tokens (or explicit 3-D "
                "position_ids) to compute M-RoPE positions"
            )
        tt = kwargs.get("mm_token_type_ids")
        if tt is None:
            tt = (input_ids == self.image_token_id).long()
            if video_id is not None:
                tt = tt + 2 * (input_ids == video_id).long()
        try:
            pos = hf.qwen_rope_index(
                self.model.model, input_ids, tt, image_grid, video_grid,
                kwargs.get("second_per_grid_ts"), attention_mask,
            )  # fmt: skip
        except (StopIteration, TypeError, IndexError, ValueError, RuntimeError) as err:
            raise UnsupportedInputError(
                "the image / video placeholder spans do not match image_grid_thw / video_grid_thw "
                "(or mm_token_type_ids)"
            ) from err
        return pos.to(input_ids.device)

    def reindex_positions(self, positions: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor):
        """Image rows keep their 3-D ids; text rows count on from max(previous ids) + 1 (spec §6).

        positions (3, B, L'), valid/visual (B, L') -> (3, B, L').
        Text id_j = max(id_{previous text} + 1, max over earlier image (h, w) ids + 1), computed as
        r_j + cummax_i(m_i − r_i) with r the text rank and m the running image bound.  The bound uses the
        spatial rows only: for images t <= h, w (same as spec §6's max over the ids); for videos it follows
        the stock rule (text after a video resumes at start + max(h', w'), whatever its temporal extent), so
        reindexing an unpruned sequence is the identity.
        """
        text = valid & ~visual
        img_next = (positions[1:].amax(0) + 1).masked_fill(~(valid & visual), 0)
        bound = img_next.cummax(1).values  # (B, L'): max image id + 1 at or before each row
        rank = text.long().cumsum(1) - 1
        slack = (bound - rank).masked_fill(~text, torch.iinfo(torch.long).min)
        text_ids = rank + slack.cummax(1).values
        out = torch.where(text[None], text_ids[None].expand_as(positions), positions)
        return out * valid[None]

    def rotary_spec(self) -> RotarySpec:
        """Plain RoPE parameters plus the M-RoPE sections (`mrope_section`, pairs per t / h / w row; the stock
        rotary module's default (16, 24, 24) when the config has none)."""
        spec = super().rotary_spec()
        params = getattr(self.text_config, "rope_parameters", None) or {}
        sections = tuple(int(x) for x in params.get("mrope_section", (16, 24, 24)))
        if len(sections) != 3 or sum(sections) != spec.head_dim // 2:
            raise UnsupportedInputError(
                f"Qwen2.5-VL mrope_section {sections} must be three pair counts summing to head_dim/2 = "
                f"{spec.head_dim // 2}"
            )
        return replace(spec, sections=sections)

    # --- vision signals (spec §7) ----------------------------------------------------------------
    def vision_hook_modules(self) -> list[nn.Module]:
        visual = self.model.model.visual
        return [visual, self.vision_attention_module()]

    def vision_attention_module(self) -> nn.Module:
        visual = self.model.model.visual
        return visual.blocks[max(visual.fullatt_block_indexes)].attn

    def vision_signals(self, module: nn.Module, x: torch.Tensor, kwargs: dict | None = None):
        visual = self.model.model.visual
        kwargs = kwargs or {}
        if module is visual:  # the tower's call: remember the grids of this encoding
            self._grid_thw = kwargs.get("grid_thw")
            return None
        grid = self._grid_thw
        if grid is None:
            raise UnsupportedInputError("Qwen2.5-VL vision signals need the ViT's grid_thw")
        return qwen_vision_signals(module, x, kwargs["position_embeddings"], grid, visual)

    def collate_vision_signals(self, captured: list[dict]) -> list[dict]:
        """Captures of one encoding (images first, then videos; each per temporal group) -> one dict of
        per-engine-image lists in prompt order."""
        if not captured:
            return captured
        kinds = [k for k in ("image", "video") if any(e.kind == k for e in self._entries)]
        groups = {k: sum(e.kind == k for e in self._entries) for k in kinds}
        got = [len(next(iter(c.values()))) for c in captured]
        if got != [groups[k] for k in kinds]:
            raise UnsupportedInputError(
                f"the vision tower was run {len(captured)} time(s) for {got} images / temporal groups but the prompt "
                f"has {groups} (beam search / num_return_sequences with vision-stage methods is unsupported)"
            )
        by_kind = dict(zip(kinds, captured, strict=True))
        queue = {k: 0 for k in kinds}
        out: dict[str, list[torch.Tensor]] = {name: [] for name in captured[0]}
        for e in self._entries:
            j = queue[e.kind]
            queue[e.kind] += 1
            for name, values in by_kind[e.kind].items():
                if int(values[j].shape[0]) != e.grid[0] * e.grid[1]:
                    raise UnsupportedInputError(
                        f"vision signals of {e.kind} {e.source} have {int(values[j].shape[0])} tokens, "
                        f"expected {e.grid[0]}×{e.grid[1]}"
                    )
                out[name].append(values[j])
        return [out]

    # --- family facts for applications -------------------------------------------------------------------
    def default_prompt(self, tokenizer, text: str, n_images: int = 1) -> str:
        """`<|vision_start|><|image_pad|><|vision_end|>` per image, a space, then the text."""
        cfg = self.model.config
        start = tokenizer.convert_ids_to_tokens(int(cfg.vision_start_token_id))
        end = tokenizer.convert_ids_to_tokens(int(cfg.vision_end_token_id))
        return f"{start}{self.image_token_text(tokenizer)}{end}" * n_images + (" " if n_images else "") + text

    def default_image_processor(self):
        """The PIL Qwen2-VL image processor with the tower's patch and merge sizes."""
        from .qwen_inputs import qwen_image_processor

        vc = self.model.config.vision_config
        return qwen_image_processor(patch_size=int(vc.patch_size), merge_size=int(vc.spatial_merge_size))

    def prepare_inputs(self, texts: list[str], images: list, tokenizer, image_processor, processor=None) -> dict:
        """Tokenizer + PIL image processor (the stock processor needs torchvision), `mm_token_type_ids` included."""
        if not images:
            enc = dict(tokenizer(texts, return_tensors="pt", padding=True))
            enc["mm_token_type_ids"] = torch.zeros_like(enc["input_ids"])
            return enc
        from .qwen_inputs import qwen_processor_inputs

        return qwen_processor_inputs(self.model.config, tokenizer, texts, images, image_processor)

    def synthetic_inputs(self, prompts, image_size=None, seed: int = 0) -> dict:
        """One image of `image_size` (W, H) per prompt; default 576 tokens (24×24 merged patches)."""
        from . import synthetic

        side = 24 * self.merge * int(self.model.config.vision_config.patch_size)
        w, h = image_size or (side, side)
        return synthetic.qwen_inputs(self.model, prompts, [(h, w)] * len(prompts), seed=seed)

    def display_layout(self, image, inputs: dict, image_processor):
        """Merged (patch·merge)-px cells over the image resized to `image_grid_thw`."""
        from PIL import Image

        from .display import Layout

        _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
        m, p = self.merge, int(self.model.config.vision_config.patch_size)
        view = image.convert("RGB").resize((gw * p, gh * p), Image.BICUBIC)
        cell = p * m
        return Layout(
            self.family,
            [(gh // m, gw // m)],
            [view],
            ["resized"],
            lambda crop, r, c: (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell),
        )


def _grid_of(kind: str, pos: torch.Tensor) -> tuple[int, int, int]:
    """(h, w, temporal groups) of one image / video span from its original 3-D ids pos (3, n).

    Images: one h×w raster grid at one t.  Videos: groups of h×w raster grids, t constant per group and
    non-decreasing (t is scaled by `second_per_grid_ts`, so groups are counted from the spatial pattern)."""
    n = int(pos.shape[1])
    t, r, c = (pos[i] - pos[i, 0] for i in range(3))
    h, w = int(r.max()) + 1, int(c.max()) + 1
    groups = n // (h * w) if h > 0 and w > 0 and n % (h * w) == 0 else 0
    ok = groups == 1 or (kind == "video" and groups > 1)
    if ok:
        cell = torch.arange(h * w, device=pos.device)
        per_group = t.view(groups, h * w)
        ok = (
            torch.equal(r, (cell // w).repeat(groups))
            and torch.equal(c, (cell % w).repeat(groups))
            and bool((per_group == per_group[:, :1]).all())
            and bool((per_group[1:, 0] >= per_group[:-1, 0]).all())
        )
    if not ok:
        shape = "temporal groups of one h×w grid" if kind == "video" else "one h×w grid"
        raise UnsupportedInputError(
            f"{kind} of {n} tokens does not form {shape} in its M-RoPE positions (bad grid_thw, or "
            f"mm_token_type_ids missing / not 1 for images and 2 for videos?)"
        )
    return h, w, groups


def qwen_vision_signals(attn, x, position_embeddings, grid_thw, visual, chunk: int = 1024):
    """Column-mean attention and keys of one full-attention block, per merged token, in raster order.

    x (S, C) the block's normed input in window order; one list entry per image / video temporal group;
    -> {"cls_attention": [(n_i,)], "vision_keys": [(n_i, C)], "vision_head_keys": [(n_i, d_h)]}.
    """
    unit = visual.spatial_merge_unit
    s = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, d)
    keys = k.float().reshape(s, -1)  # pre-RoPE keys of all heads (n, C), like CLIP's `vision_keys`
    head_keys = k.float().mean(1)  # (S, d) pre-RoPE head-mean keys (spec §7 item 4)
    cos, sin = position_embeddings
    q, k = hf.qwen_vision_rotary(q, k, cos, sin)
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (H, S, d)
    # one softmax per image / video temporal group, the ViT's own full-attention segments (contiguous
    # blocks in window order too: windows never cross a temporal group)
    sizes = grid_thw[:, 1:].prod(-1).repeat_interleave(grid_thw[:, 0]).tolist()
    scores = torch.zeros(s, dtype=torch.float32, device=x.device)
    start = 0
    for size in sizes:
        kk = k[:, start : start + size]
        total = torch.zeros(size, dtype=torch.float32, device=x.device)
        for a in range(0, size, chunk):
            qq = q[:, start + a : start + min(a + chunk, size)]
            total += ((qq @ kk.transpose(-1, -2)) * attn.scaling).softmax(-1).sum((0, 1))
        scores[start : start + size] = total / (size * attn.num_heads)
        start += size
    window_index = hf.qwen_vision_window_index(
        grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
    )
    reverse = torch.argsort(window_index.to(x.device))
    grouped_scores = scores.view(-1, unit).mean(1)[reverse]
    grouped_keys = keys.view(-1, unit, keys.shape[-1]).mean(1)[reverse]
    grouped_head_keys = head_keys.view(-1, unit, head_keys.shape[-1]).mean(1)[reverse]
    counts = [size // unit for size in sizes]  # per image / temporal group
    return {
        "cls_attention": list(grouped_scores.split(counts)),
        "vision_keys": list(grouped_keys.to(x.dtype).split(counts)),
        "vision_head_keys": list(grouped_head_keys.to(x.dtype).split(counts)),
    }
