"""Adapter for `Qwen2_5_VLForConditionalGeneration`: windowed ViT + 2×2 merger, Qwen2 decoder with M-RoPE.

- Positions: 3-D M-RoPE ids `(3, B, L)` from the model's own `get_rope_index` on the *unpruned* input (or
  the 4-row ids `generate` builds, whose text row is dropped); the engine gathers them for kept rows and
  decodes from max(original id) + 1 + t, exactly as the stock model does.
- `reindex` (spec §6): kept image tokens keep their gathered 3-D ids (grid coordinates), text is
  renumbered contiguously and resumes after max(kept image ids) + 1.
- Grids: each image is one crop whose (row, col) coordinates are read back from the 3-D ids, so they are
  available even when `generate` has already consumed `image_grid_thw`.
- Vision signals without [CLS] (spec §7): the last full-attention ViT block's attention, recomputed per
  image in chunks of query rows; `cls_attention` = column mean over heads and query patches, averaged
  over each 2×2 merge group; `vision_keys` = the block's *pre-RoPE* keys, all heads (n, C) like the LLaVA
  adapter's (a method splits heads / takes the spec's head mean itself), averaged the same way;
  both un-permuted from window order to the merger's raster order.
- Video: not supported by vtprune yet. A prompt with video tokens (or `pixel_values_videos`) raises
  `UnsupportedInputError` while a pruning method is attached, so a mixed image/video batch is refused too.
- Sliding-window decoder layers (`use_sliding_window=True`, off in every released Qwen2.5-VL) are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedInputError
from .base import ModelAdapter


class Qwen2_5_VLAdapter(ModelAdapter):
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    position_rows = 3
    # popped once pruned features are passed as `mm_encoder_outputs` with explicit positions (notes P8)
    image_kwargs = ("pixel_values", "image_grid_thw", "mm_token_type_ids")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if any(t != "full_attention" for t in getattr(self.text_config, "layer_types", None) or ()):
            raise UnsupportedInputError("Qwen2.5-VL with sliding-window decoder layers is not supported by vtprune")
        self._layouts: list[tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]] = []
        self._grid_thw: torch.Tensor | None = None

    # --- images ----------------------------------------------------------------------------------
    @property
    def merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def check_inputs(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        video_id = getattr(self.model.config, "video_token_id", None)
        has_video = kwargs.get("pixel_values_videos") is not None or (
            video_id is not None and bool((input_ids == video_id).any())
        )
        mm = kwargs.get("mm_encoder_outputs") or {}
        if has_video or mm.get("video") is not None:
            raise UnsupportedInputError(
                "vtprune does not support Qwen2.5-VL video inputs yet (also not mixed image/video batches); "
                "detach the method (vtprune.remove) for video prompts"
            )

    def encode_images(self, kwargs: dict) -> list[torch.Tensor]:
        grid = kwargs.get("image_grid_thw")
        if grid is None:
            raise UnsupportedInputError("Qwen2.5-VL needs image_grid_thw alongside pixel_values")
        out = self.model.model.get_image_features(kwargs["pixel_values"], grid, return_dict=True)
        return list(out.pooler_output)

    def begin_prefill(self, input_ids, mask2d, positions, images_rows: list[list[torch.Tensor]], kwargs=None) -> None:
        """Per-image merged grids and (row, col) coordinates, read from the original 3-D ids."""
        self._layouts = []
        for b, per_image in enumerate(images_rows):
            for rows in per_image:
                pos = positions[:, b, rows]  # (3, n)
                start = pos[0, 0]
                t, r, c = pos[0] - start, pos[1] - start, pos[2] - start
                h, w = int(r.max()) + 1, int(c.max()) + 1
                if int(t.max()) != 0 or rows.numel() != h * w:
                    raise UnsupportedInputError(
                        f"image of {rows.numel()} tokens does not form one {h}×{w} grid (video or bad positions?)"
                    )
                self._layouts.append(([(h, w)], torch.stack([r, c], 1).long().cpu(), torch.zeros_like(r).long().cpu()))

    def image_layout(self, image_index: int, n: int):
        grids, coords, crop = self._layouts[image_index]
        return grids, coords, crop

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
        grid = kwargs.get("image_grid_thw")
        if grid is None:
            raise UnsupportedInputError(
                "Qwen2.5-VL needs image_grid_thw (or explicit 3-D position_ids) to compute M-RoPE positions"
            )
        tt = kwargs.get("mm_token_type_ids")
        if tt is None:
            tt = (input_ids == self.image_token_id).long()
        pos, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=tt, image_grid_thw=grid, attention_mask=attention_mask
        )
        return pos.to(input_ids.device)

    def reindex_positions(self, positions: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor):
        """Image rows keep their 3-D ids; text rows count on from max(previous ids) + 1 (spec §6).

        positions (3, B, L'), valid/visual (B, L') -> (3, B, L').
        Text id_j = max(id_{previous text} + 1, max over earlier image ids + 1), computed as
        r_j + cummax_i(m_i − r_i) with r the text rank and m the running image bound.
        """
        text = valid & ~visual
        img_next = (positions.amax(0) + 1).masked_fill(~(valid & visual), 0)
        bound = img_next.cummax(1).values  # (B, L'): max image id + 1 at or before each row
        rank = text.long().cumsum(1) - 1
        slack = (bound - rank).masked_fill(~text, torch.iinfo(torch.long).min)
        text_ids = rank + slack.cummax(1).values
        out = torch.where(text[None], text_ids[None].expand_as(positions), positions)
        return out * valid[None]

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


def qwen_vision_signals(attn, x, position_embeddings, grid_thw, visual, chunk: int = 1024):
    """Column-mean attention and keys of one full-attention block, per merged token, in raster order.

    x (S, C) the block's normed input in window order;
    -> {"cls_attention": [(n_i,)], "vision_keys": [(n_i, C)], "vision_head_keys": [(n_i, d_h)]}.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    unit = visual.spatial_merge_unit
    s = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, d)
    keys = k.float().reshape(s, -1)  # pre-RoPE keys of all heads (n, C), like CLIP's `vision_keys`
    head_keys = k.float().mean(1)  # (S, d) pre-RoPE head-mean keys (spec §7 item 4)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (H, S, d)
    sizes = (grid_thw.prod(-1)).tolist()
    scores = torch.zeros(s, dtype=torch.float32, device=x.device)
    start = 0
    for size in sizes:  # one softmax per image (images keep contiguous blocks in window order)
        kk = k[:, start : start + size]
        total = torch.zeros(size, dtype=torch.float32, device=x.device)
        for a in range(0, size, chunk):
            qq = q[:, start + a : start + min(a + chunk, size)]
            total += ((qq @ kk.transpose(-1, -2)) * attn.scaling).softmax(-1).sum((0, 1))
        scores[start : start + size] = total / (size * attn.num_heads)
        start += size
    window_index, _ = get_vision_window_index(
        grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
    )
    reverse = torch.argsort(window_index.to(x.device))
    grouped_scores = scores.view(-1, unit).mean(1)[reverse]
    grouped_keys = keys.view(-1, unit, keys.shape[-1]).mean(1)[reverse]
    grouped_head_keys = head_keys.view(-1, unit, head_keys.shape[-1]).mean(1)[reverse]
    counts = (grid_thw.prod(-1) // unit).tolist()
    return {
        "cls_attention": list(grouped_scores.split(counts)),
        "vision_keys": list(grouped_keys.to(x.dtype).split(counts)),
        "vision_head_keys": list(grouped_head_keys.to(x.dtype).split(counts)),
    }
