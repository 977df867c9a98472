"""Adapter for `Qwen3VLForConditionalGeneration`: full-attention ViT + 2×2 merger + DeepStack, Qwen3 decoder
(q/k RMS norms) with *interleaved* M-RoPE.

Built on the Qwen2.5-VL adapter (positions from the model's own `get_rope_index` on the unpruned prompt,
`reindex`, grids read back from the 3-D ids, images and videos mixed in one batch). What differs:

- **DeepStack** (spec README, this family): the ViT's blocks `deepstack_visual_indexes` each give one more
  (n, D) feature map per image, added to the visual rows of the hidden states after decoder layers
  0, 1, … (one level per layer). Pruned consistently with the kept tokens:
  - pre-LLM (`vision` / `pre_llm` stages): every level keeps the same rows as the main features
    (`note_kept_rows` from the engine); merged tokens take the level rows of their representative
    (the kept candidate), tokens a plan inserts get zero rows (nothing injected);
  - in-LLM (`llm:k` stages): the engine takes the injection out of the stock loop (`take_injections`)
    and re-adds it after each DeepStack layer on the rows still present (`inject`): rows already dropped
    are not re-injected, kept rows get exactly the stock sum.
- **Video**: the processor writes a timestamp (`<t seconds>`) before every temporal group, so each group
  is its own `<|vision_start|> … <|vision_end|>` run with its own t id (`get_rope_index` splits
  `video_grid_thw` per frame group); every run is one engine "image" of h×w tokens. Groups are mapped to
  their video through `video_grid_thw` (remembered from `generate` as a layout kwarg). A video run that
  holds more than one group (no timestamp text between frames) is refused.
- **Vision signals** (spec §7, no [CLS]): every ViT block attends fully within its image / frame group, so
  the signals come from the *last* block's attention: column mean over heads and query patches, averaged
  over each 2×2 merge group (raster order, no window permutation); `vision_keys` / `vision_head_keys` are
  its pre-RoPE keys likewise averaged.
- `query_key_states` applies the Qwen3 q/k norms before RoPE; `rotary_spec` describes the interleaved
  section layout (`pair_rows`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .. import hf_compat as hf
from ..errors import UnsupportedInputError
from .base import RotarySpec, apply_rope
from .qwen2_5_vl import Qwen2_5_VLAdapter, _Entry, _grid_of


def _deepstack_output(pooler: list[torch.Tensor], deepstack: list[list[torch.Tensor]]):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    return BaseModelOutputWithDeepstackFeatures(pooler_output=pooler, deepstack_features=deepstack)


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration",)
    model_types = ("qwen3_vl",)
    image_kwargs = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "mm_token_type_ids",
    )
    layout_kwargs = ("video_grid_thw",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._deepstack: list[list[torch.Tensor]] = []  # per level, per engine image (n_i, D)
        self._sources: list[torch.Tensor | None] | None = None

    # --- images and videos -----------------------------------------------------------------------
    @property
    def deepstack_levels(self) -> int:
        return len(self.model.config.vision_config.deepstack_visual_indexes or ())

    def encode_images(self, kwargs: dict) -> list[torch.Tensor]:
        """Images and videos of the call -> features per engine image; the DeepStack levels are kept aside."""
        outs = {}
        for kind, pix, grid_name in (
            ("image", "pixel_values", "image_grid_thw"),
            ("video", "pixel_values_videos", "video_grid_thw"),
        ):
            if kwargs.get(pix) is None:
                continue
            grid = kwargs.get(grid_name)
            if grid is None:
                raise UnsupportedInputError(f"Qwen3-VL needs {grid_name} alongside {pix}")
            fn = self.model.model.get_image_features if kind == "image" else self.model.model.get_video_features
            outs[kind] = fn(kwargs[pix], grid, return_dict=True)
        return self._unpack(outs.get("image"), outs.get("video"))

    def features_from_kwargs(self, kwargs: dict) -> list[torch.Tensor] | None:
        mm = kwargs.get("mm_encoder_outputs") or {}
        images, videos = mm.get("image"), mm.get("video")
        if images is None and videos is None:
            return None
        return self._unpack(images, videos)

    def _unpack(self, images, videos) -> list[torch.Tensor]:
        """Encoder outputs (pooler_output and deepstack_features per image / video) -> main features per engine
        image; each DeepStack level is cut the same way into `self._deepstack`."""
        main = self._per_entry(
            None if images is None else list(images.pooler_output),
            None if videos is None else list(videos.pooler_output),
            "features",
        )
        levels = []
        for level in range(self.deepstack_levels):
            per = []
            for out in (images, videos):
                ds = None if out is None else getattr(out, "deepstack_features", None)
                if out is not None and (ds is None or len(ds) != self.deepstack_levels):
                    raise UnsupportedInputError(
                        f"Qwen3-VL encoder outputs must carry {self.deepstack_levels} DeepStack feature levels"
                    )
                per.append(None if out is None else list(ds[level]))
            levels.append(self._per_entry(per[0], per[1], f"DeepStack level {level} features"))
        self._deepstack = levels
        self._sources = None
        return main

    def note_kept_rows(self, sources: list[torch.Tensor | None]) -> None:
        """Per engine image: the candidate row behind each output token (−1: inserted), None when unpruned."""
        self._sources = sources

    def features_to_kwargs(self, feats: list[torch.Tensor]) -> dict:
        """Per engine image -> {"image": …, "video": …} with every DeepStack level pruned to the kept rows."""
        sources = self._sources if self._sources is not None else [None] * len(feats)
        levels = []
        for level in self._deepstack:
            rows = []
            for full, src, f in zip(level, sources, feats, strict=True):
                if src is None:
                    rows.append(full)
                    continue
                picked = full[src.clamp(min=0).to(full.device)]
                rows.append(picked.masked_fill((src < 0).to(full.device)[:, None], 0.0))
                if picked.shape[0] != f.shape[0]:
                    raise UnsupportedInputError("DeepStack rows do not line up with the pruned features")
            levels.append(rows)
        out: dict = {"image": None, "video": None}
        for kind in ("image", "video"):
            idx = [i for i, e in enumerate(self._entries) if e.kind == kind]
            if not idx:
                continue
            pooler = self._by_source(kind, [feats[i] for i in idx])
            deepstack = [self._by_source(kind, [lv[i] for i in idx]) for lv in levels]
            out[kind] = _deepstack_output(pooler, deepstack)
        self._sources = None
        return out

    def _by_source(self, kind: str, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors of the engine images of one kind (prompt order) -> one per image / video (groups joined)."""
        groups: dict[int, list[torch.Tensor]] = {}
        for e, t in zip([e for e in self._entries if e.kind == kind], parts, strict=True):
            groups.setdefault(e.source, []).append(t)
        return [torch.cat(v) if len(v) > 1 else v[0] for v in groups.values()]

    def begin_prefill(self, input_ids, mask2d, positions, images_rows: list[list[torch.Tensor]], kwargs=None):
        """Cut each sample's placeholder runs into images and video frame groups (one run each), grids from
        the original 3-D ids; video groups are assigned to their video through `video_grid_thw`."""
        kwargs = kwargs or {}
        self._entries = []
        video_id = self.video_token_id
        grid = kwargs.get("video_grid_thw")
        frames = [] if grid is None else [int(t) for t in grid[:, 0]]
        n_image, n_video, group = 0, 0, 0
        split: list[list[torch.Tensor]] = []
        for b, runs in enumerate(images_rows):
            mine: list[torch.Tensor] = []
            for run in runs:
                ids = input_ids[b, run]
                cuts = ((ids[1:] != ids[:-1]).nonzero().flatten() + 1).tolist()
                for rows in torch.tensor_split(run, cuts):
                    kind = "video" if video_id is not None and int(input_ids[b, rows[0]]) == video_id else "image"
                    h, w, groups = _grid_of(kind, positions[:, b, rows])
                    if kind == "image":
                        self._entries.append(_Entry("image", n_image, 0, 1, (h, w)))
                        n_image += 1
                    else:
                        if groups != 1:
                            raise UnsupportedInputError(
                                f"a Qwen3-VL video run of {rows.numel()} tokens holds {groups} frame groups; the "
                                "processor separates them with timestamp text (one <|vision_start|> run per group)"
                            )
                        if n_video >= len(frames):
                            raise UnsupportedInputError(
                                "Qwen3-VL video tokens need video_grid_thw (one row per video) to map frame groups "
                                "to videos"
                            )
                        self._entries.append(_Entry("video", n_video, group, frames[n_video], (h, w)))
                        group += 1
                        if group == frames[n_video]:
                            n_video, group = n_video + 1, 0
                    mine.append(rows)
            split.append(mine)
        if frames and (n_video, group) != (len(frames), 0):
            raise UnsupportedInputError(f"the prompt's video runs do not match video_grid_thw frame groups {frames}")
        return split

    # --- positions and attention -----------------------------------------------------------------
    def rotary_spec(self) -> RotarySpec:
        """Plain RoPE parameters plus the interleaved M-RoPE layout: pair i uses row 1 (h) when i ≡ 1 (mod 3)
        and i < 3·sections[1], row 2 (w) when i ≡ 2 (mod 3) and i < 3·sections[2], else row 0 (t)."""
        spec = super(Qwen2_5_VLAdapter, self).rotary_spec()
        params = getattr(self.text_config, "rope_parameters", None) or {}
        sections = tuple(int(x) for x in params.get("mrope_section", (24, 20, 20)))
        half = spec.head_dim // 2
        if len(sections) != 3 or sum(sections) != half:
            raise UnsupportedInputError(
                f"Qwen3-VL mrope_section {sections} must be three pair counts summing to head_dim/2 = {half}"
            )
        i = torch.arange(half)
        rows = torch.zeros(half, dtype=torch.long)
        rows[(i % 3 == 1) & (i < 3 * sections[1])] = 1
        rows[(i % 3 == 2) & (i < 3 * sections[2])] = 2
        return replace(spec, sections=sections, pair_rows=tuple(rows.tolist()))

    def query_key_states(self, layer: nn.Module, hidden: torch.Tensor, pos_emb, rows: torch.Tensor, keys=None):
        """As the Llama-style default, with Qwen3's per-head q_norm / k_norm before RoPE."""
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        bsz, length, _ = x.shape
        hd = attn.head_dim
        cos, sin = (t.expand(bsz, -1, -1) for t in pos_emb)
        xr = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
        q = attn.q_norm(attn.q_proj(xr).view(bsz, rows.shape[1], -1, hd)).transpose(1, 2)
        idx = rows[..., None].expand(-1, -1, cos.shape[-1])
        q = apply_rope(q, cos.gather(1, idx), sin.gather(1, idx))
        if keys is None:
            k = attn.k_norm(attn.k_proj(x).view(bsz, length, -1, hd)).transpose(1, 2)
            keys = apply_rope(k, cos, sin)
        groups = q.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
        return q, keys, float(attn.scaling)

    # --- DeepStack under in-LLM pruning ----------------------------------------------------------
    def injection_layers(self) -> tuple[int, ...]:
        """Decoder layers after whose output DeepStack adds its levels (0, 1, …)."""
        return tuple(range(min(self.deepstack_levels, self.num_layers)))

    def injection_module(self) -> nn.Module:
        return self.language_model

    def take_injections(self, kwargs: dict):
        """From the language model's call kwargs: pop the DeepStack inputs so that the stock loop adds nothing.
        -> (visual_pos_masks (B, L0) bool, [(n_vis, D)] per level) or None when the call has none."""
        embeds = kwargs.get("deepstack_visual_embeds")
        mask = kwargs.get("visual_pos_masks")
        if embeds is None or mask is None:
            return None
        kwargs["deepstack_visual_embeds"] = None
        return mask, list(embeds)

    def inject(self, state, layer_idx: int, hidden: torch.Tensor, lm_rows: torch.Tensor) -> torch.Tensor:
        """hidden (B, L', D) output of `layer_idx`; lm_rows (B, L') the language-model input row of each current
        row (−1 on padding) -> hidden with that level added on the visual rows still present (the stock sum)."""
        mask, levels = state
        if layer_idx >= len(levels):
            return hidden
        mask = mask.to(hidden.device)
        rank = mask.flatten().long().cumsum(0).view(mask.shape) - 1  # (B, L0) index into the level's rows
        src = lm_rows.clamp(min=0)
        here = mask.gather(1, src) & (lm_rows >= 0)
        picked = rank.gather(1, src)[here]
        out = hidden.clone()
        out[here, :] = out[here, :] + levels[layer_idx].to(hidden.device, hidden.dtype)[picked]
        return out

    # --- vision signals (spec §7) ----------------------------------------------------------------
    def vision_attention_module(self) -> nn.Module:
        return self.model.model.visual.blocks[-1].attn

    def vision_signals(self, module: nn.Module, x: torch.Tensor, kwargs: dict | None = None):
        visual = self.model.model.visual
        kwargs = kwargs or {}
        if module is visual:
            self._grid_thw = kwargs.get("grid_thw")
            return None
        if self._grid_thw is None:
            raise UnsupportedInputError("Qwen3-VL vision signals need the ViT's grid_thw")
        return qwen3_vision_signals(module, x, kwargs["position_embeddings"], self._grid_thw, visual)


def qwen3_vision_signals(attn, x, position_embeddings, grid_thw, visual, chunk: int = 1024):
    """Column-mean attention and keys of one full-attention ViT block, per merged token.

    x (S, C) the block's normed input (patches in merge-block order); one softmax per image / video frame
    group -> {"cls_attention": [(n_i,)], "vision_keys": [(n_i, C)], "vision_head_keys": [(n_i, d_h)]}.
    """
    unit = visual.spatial_merge_unit
    s = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, d)
    keys = k.float().reshape(s, -1)
    head_keys = k.float().mean(1)
    cos, sin = position_embeddings
    q, k = hf.qwen_vision_rotary(q, k, cos, sin)  # the same vision RoPE as Qwen2.5-VL
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (H, S, d)
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
    counts = [size // unit for size in sizes]
    return {
        "cls_attention": list(scores.view(-1, unit).mean(1).split(counts)),
        "vision_keys": list(keys.view(-1, unit, keys.shape[-1]).mean(1).to(x.dtype).split(counts)),
        "vision_head_keys": list(head_keys.view(-1, unit, head_keys.shape[-1]).mean(1).to(x.dtype).split(counts)),
    }
