"""`PruningSession`: the hook, cache, mask and position plumbing, written once for every method and model.

One session is attached to one model instance (`model._vtprune`). It installs:

- a forward pre-hook on the top-level model: at prefill it finds the images, solves budgets, runs the
  `vision`/`pre_llm` stage (shortened ids + pruned `mm_encoder_outputs`, original position ids; tokens a
  plan inserts, e.g. VisionZip's [CLS], take a copy of their slot's row: image-token id and position id) and
  sets up the state the decoder-layer hooks use; at decode it replaces the padding mask and position ids
  with the pruned ones it keeps for the cache;
- forward pre-hooks on decoder layers: at an `llm:k` stage the hidden states, (cos, sin), position ids
  and the mask are gathered to the kept rows (re-left-padded) and every later layer of the group gets
  those instead of the model's full-length objects; layer k−1 captures its input for the signals;
- forward hooks on the decoder layers a method names in `repair_layers()` (RCP's repair adapters): the method's
  `repair` rewrites the layer's output rows at generation positions (prefill: the last prompt row of each
  sample, or every row from `generation_start` on; decode: every new row), with the memos of that sample's
  images as context;
- optionally pre-hooks on the adapter's vision modules ([CLS] attention, keys, projector input) and forward
  hooks on its vision output modules (e.g. the CLIP feature layer's [CLS] output row);
- a per-instance `generate` guard that refuses static caches and chunked prefill.

`remove()` takes all of it away again; no class is patched and no weight or config is touched.

Shapes: B batch, L rows of the current group, D hidden size.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .. import hf_compat as hf
from ..budget import Budget, image_budgets
from ..contract.method import ImageTokens, KeepPlan, PruningMethod, Stage
from ..errors import UnsupportedInputError, VtpruneError
from ..measurement.flops import LLMDims
from ..models.base import ModelAdapter
from ..record import PruningEvent, RunRecord, SampleRecord, SelectCall
from ..text import question_nouns, strip_generation_header
from . import guards
from . import signals as sig
from .sequence import (
    compact_rows,
    copy_rank,
    gather_positions,
    gather_rows,
    next_positions,
    step_positions,
)

POSITION_POLICIES = ("keep", "reindex")


@dataclass
class _Image:
    """One image of the batch during a prefill."""

    sample: int
    offset: int  # first index of this image in the sample's visual-token list
    n: int
    counts: list[int]  # visual tokens kept after each stage (n everywhere when bypassed)
    grids: list[tuple[int, int]]
    coords: torch.Tensor  # (n, 2)
    crop: torch.Tensor  # (n,)
    seed: int
    span: torch.Tensor  # (S,) all placeholder rows of the image (visual + structural), ascending
    cand: torch.Tensor | None  # (S,) bool visual rows of the span, None when all are visual
    signals: dict[str, torch.Tensor] = field(default_factory=dict)  # vision and text signals of the image
    memo: dict = field(default_factory=dict)  # the method's per-image state across stages
    question: str | None = None
    embeddings: torch.Tensor | None = None  # (n, D) layer-0 input rows of the candidates (visual_embeddings)
    tile: torch.Tensor | None = None  # (n,) vision-encoder view of each candidate (LLaVA-NeXT tiles)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> kept original indices (cpu)
    merged: set[int] = field(default_factory=set)  # stages whose kept rows carry merged features
    inserted: dict[int, int] = field(default_factory=dict)  # stage -> tokens the plan inserted (not candidates)
    merged_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> original indices given merged rows
    selections: list[SelectCall] = field(default_factory=list)  # this image's `select` calls (timed)


@dataclass
class _Group:
    """Rows shared by a run of decoder layers [start, next group's start)."""

    start: int
    mask2d: torch.Tensor  # (B, L) int64 padding mask
    positions: torch.Tensor  # (B, L) or (R, B, L) position ids of the rows
    vis_image: torch.Tensor  # (B, L) int64 image id of each row, −1 for text/structure/padding
    vis_index: torch.Tensor  # (B, L) int64 original index inside its image (representative), −1 otherwise
    #   (−1 also on inserted tokens: visual rows, vis_image >= 0, that are no candidate)
    seq_index: torch.Tensor  # (B, L) int64 index into the input rows (inserted tokens: their slot's), −1 on padding
    next_pos: torch.Tensor  # (B,) position of the next generated token
    #: per layer kind (`ModelAdapter.layer_kind`, None for single-kind models): (cos, sin) and attention_mask of
    #: this group's rows (in-LLM groups only)
    pos_emb: dict = field(default_factory=dict)
    mask: dict = field(default_factory=dict)
    step_positions: torch.Tensor | None = None  # position ids of the current decode step
    in_llm: bool = False  # made by an in-LLM stage: its layers get `mask` / `pos_emb` instead of the model's


@dataclass
class _Forward:
    """State of one forward call (prefill) that the decode steps on the same cache keep using."""

    prefill: bool
    images: list[_Image]
    groups: list[_Group]
    cache: object
    n_visual: list[int]
    captured: dict[int, tuple] = field(default_factory=dict)
    suffix_rows: list[torch.Tensor] = field(default_factory=list)  # per sample: input rows of the question span
    injection: object = None  # the adapter's `take_injections` state at a prefill with in-LLM stages

    def group_for(self, layer_idx: int) -> _Group:
        for g in reversed(self.groups):
            if g.start <= layer_idx:
                return g
        return self.groups[0]


class PruningSession:
    """Physical visual-token pruning on one model instance."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        method: PruningMethod,
        budget: Budget,
        positions: str = "keep",
        tokenizer=None,
    ):
        if not isinstance(positions, str) or any(r not in POSITION_POLICIES for r in positions.split(",")):
            raise VtpruneError(
                f"positions must be one of {POSITION_POLICIES} or one of them per stage, comma-separated "
                f"(e.g. 'reindex,keep,reindex'), got {positions!r}"
            )
        self.model, self.adapter, self.method = model, adapter, method
        self.budget, self.positions = budget, positions
        self._tokenizer = tokenizer
        if adapter.dynamic_resolution and getattr(method, "resizes_images", False):
            raise UnsupportedInputError(
                f"{method.name!r} on {type(model).__name__} is an input transform: resize the images before the "
                "processor with vtprune.methods.downsample.downsample_image(image, ratio=ρ or factor=D) and run "
                "the model unpatched (a forward hook cannot resize an image the processor already cut into patches)"
            )
        method.available_signals = sig.LLM_SIGNALS | sig.TEXT_SIGNALS | adapter.vision_signal_names
        method.model_name = str(getattr(model, "name_or_path", "") or "") or None
        method.model_signature = {
            "model_class": type(model).__name__,
            "hidden_size": int(adapter.text_config.hidden_size),
            "num_layers": int(adapter.num_layers),
        }
        method.bind(adapter.num_layers)
        self.stages: tuple[Stage, ...] = method.stages()
        method.validate(adapter.num_layers)
        _check_stage_order(method.name, self.stages)
        adapter.check_stages(method.name, self.stages)  # a family may refuse some stage kinds (Gemma 3: llm:k)
        if method.inserts and any(s.kind == "llm" for s in self.stages):
            raise VtpruneError(
                f"method {method.name!r} inserts tokens before the LLM; in-LLM stages after inserted tokens are not "
                "supported by the engine"
            )
        needed = method.required_positions()
        if needed is not None and needed != positions:
            raise VtpruneError(
                f"method {method.name!r} with preset={getattr(method.config, 'preset', None)!r} reproduces reference "
                f"position ids that need positions={needed!r} (got positions={positions!r}): pass "
                f"vtprune.apply(..., positions={needed!r})"
            )
        rules = positions.split(",")  # one rule per stage ("keep"/"reindex" alone: the same rule at every stage)
        if len(rules) not in (1, len(self.stages)):
            raise VtpruneError(
                f"positions={positions!r} names {len(rules)} rules but method {method.name!r} has "
                f"{len(self.stages)} stages ({', '.join(map(str, self.stages))}): give one rule per stage"
            )
        #: position rule of the event that starts each group (layer 0 for a vision/pre_llm stage). A per-stage list
        #: decodes from layer 0's next id in every layer (as the stock model computes it); only "reindex" alone
        #: decodes each layer from its own length.
        self._rule_at = {
            (0 if s.before_llm else s.layer): rules[min(i, len(rules) - 1)] for i, s in enumerate(self.stages)
        }
        self.pre_stage = 0 if self.stages and self.stages[0].before_llm else None
        self._kind_of = [adapter.layer_kind(i) for i in range(adapter.num_layers)]  # see ModelAdapter.layer_kind
        self._kinds = tuple(dict.fromkeys(self._kind_of))
        self.stage_at_layer = {s.layer: i for i, s in enumerate(self.stages) if s.kind == "llm"}
        previous_layer = sig.LLM_SIGNALS - sig.OWN_LAYER_SIGNALS  # computed from layer k−1's captured input
        self.capture_layers = {
            s.layer - 1 for i, s in enumerate(self.stages) if s.kind == "llm" and method.signals(i) & previous_layer
        }
        if -1 in self.capture_layers:
            raise VtpruneError(
                f"method {method.name!r} acts at llm:0 with signals of layer k−1 "
                f"{sorted(method.signals(self.stage_at_layer[0]) & previous_layer)}; at llm:0 only the in-layer "
                f"signals {sorted(sig.OWN_LAYER_SIGNALS)} exist"
            )
        #: decoder layers whose output the method repairs (`PruningMethod.repair_layers`)
        self.repair_layers = tuple(sorted(set(method.repair_layers())))
        if any(not 0 <= r < adapter.num_layers for r in self.repair_layers):
            raise VtpruneError(
                f"method {method.name!r} repairs layers {list(self.repair_layers)}, but the language model has "
                f"{adapter.num_layers} layers"
            )
        #: Generation positions for the repair hooks at a prefill: None (default) = the last prompt row of each
        #: sample; an int g = every row whose *input* index is >= g (the uncached replay of prompt + generated
        #: ids sets it to the prompt length − 1 so that the same rows are repaired as in cached decoding). When
        #: set, the question span also ends at input row g (the last prompt row), so prompt + generated ids give
        #: the same in-LLM signals as the prompt alone; under per-stage position rules, rows after g keep layer 0's
        #: ids at in-LLM "reindex" events, as cached decoding gives them.
        self.generation_start: int | None = None
        self.needs_vision = any(method.signals(i) & sig.VISION_SIGNALS for i in range(len(self.stages)))
        missing = frozenset().union(*(method.signals(i) for i in range(len(self.stages)))) & (
            sig.VISION_SIGNALS - adapter.vision_signal_names
        )
        if missing:
            raise UnsupportedInputError(
                f"method {method.name!r} needs the vision signals {sorted(missing)}, which "
                f"{type(model).__name__} does not provide (see the method's options for a variant without them)"
                + getattr(adapter, "missing_signal_hint", lambda _: "")(missing)
            )
        self.text_wanted = frozenset().union(*(method.signals(i) & sig.TEXT_SIGNALS for i in range(len(self.stages))))
        #: layer 0's input is captured when an in-LLM stage wants the candidates' input embeddings
        self.capture_layer0 = any(
            s.kind == "llm" and "visual_embeddings" in method.signals(i) for i, s in enumerate(self.stages)
        )
        if self.capture_layer0:
            self.capture_layers.add(0)
        self.needs_suffix_rows = any(sig.SUFFIX_SIGNALS & method.signals(i) for i in range(len(self.stages)))
        if self.text_wanted & {"noun_embeddings", "question_text"}:
            _ = self.tokenizer  # fail at apply time when no tokenizer can be found
        self.dims = LLMDims.from_config(adapter.text_config)
        self._handles: list = []
        self._forward: _Forward | None = None
        self._decode: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._vision_capture: list[dict[str, torch.Tensor]] = []
        self._mute_vision = False  # True while a method runs the projector (`ImageTokens.project`)
        self._generate_kwargs: dict = {}
        self._suffix_rows: list[torch.Tensor] = []
        self.last: RunRecord | None = None
        self._check_nominal_budget()

    @property
    def tokenizer(self):
        """The tokenizer given to `apply`, else one loaded from the model's local directory (no download)."""
        if self._tokenizer is None:
            path = getattr(self.model, "name_or_path", "") or getattr(self.model.config, "_name_or_path", "")
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as err:
                raise VtpruneError(
                    f"method {self.method.name!r} needs the tokenizer to read the question (signals "
                    f"{sorted(self.text_wanted & {'noun_embeddings', 'question_text'})}); none was found at "
                    f"{path!r}: pass vtprune.apply(..., tokenizer=processor.tokenizer)"
                ) from err
        return getattr(self._tokenizer, "tokenizer", self._tokenizer)  # a processor is accepted too

    # --- installation ----------------------------------------------------------------------------
    def install(self) -> None:
        m = self.model
        self._handles.append(m.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(m.register_forward_hook(self._after_model_call))
        if self.stage_at_layer:
            first = min(min(self.stage_at_layer), min(self.capture_layers, default=10**9))
            for idx in range(first, self.adapter.num_layers):
                layer = self.adapter.layers[idx]
                self._handles.append(layer.register_forward_pre_hook(partial(self._on_layer, idx), with_kwargs=True))
        for idx in self.repair_layers:
            layer = self.adapter.layers[idx]
            self._handles.append(layer.register_forward_hook(partial(self._on_layer_output, idx)))
        if self.stage_at_layer and self.adapter.injection_layers():  # e.g. DeepStack under in-LLM pruning
            owner = self.adapter.injection_module()
            self._handles.append(owner.register_forward_pre_hook(self._on_injection_call, with_kwargs=True))
            for idx in self.adapter.injection_layers():
                layer = self.adapter.layers[idx]
                self._handles.append(layer.register_forward_hook(partial(self._on_injection_layer, idx)))
        if self.needs_vision:
            for module in self.adapter.vision_hook_modules():
                self._handles.append(module.register_forward_pre_hook(self._on_vision_attention, with_kwargs=True))
            for module in self.adapter.vision_output_modules():
                self._handles.append(module.register_forward_hook(self._on_vision_output))
        stock_generate = m.generate
        m.__dict__["generate"] = partial(self._guarded_generate, stock_generate)
        guards.install_thread_guard(self)  # one call at a time per patched model (issue 20)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.__dict__.pop("generate", None)
        self._forward = None
        self._decode = weakref.WeakKeyDictionary()
        self._vision_capture.clear()

    def _guarded_generate(self, stock_generate, *args, **kwargs):
        gc = kwargs.get("generation_config") or self.model.generation_config
        problem = hf.generation_cache_problem(kwargs, gc)
        if problem is not None:
            raise UnsupportedInputError(problem)
        self._vision_capture.clear()
        self._generate_kwargs = {n: kwargs[n] for n in self.adapter.layout_kwargs if kwargs.get(n) is not None}
        try:
            return stock_generate(*args, **kwargs)
        finally:
            self._generate_kwargs = {}

    def _check_nominal_budget(self) -> None:
        """Fail at apply time when the budget is infeasible for the model's fixed token count."""
        n = self.adapter.nominal_visual_tokens()
        if n and self.stages:
            k = self.budget.tokens_for(n)
            if k < n:
                self.method.schedule(n, k, self.budget.mode, self.adapter.num_layers)

    # --- hooks -----------------------------------------------------------------------------------
    def _on_vision_attention(self, module, args, kwargs):
        if self._mute_vision:
            return
        x = kwargs.get("hidden_states", args[0] if args else None)
        with torch.no_grad():
            out = self.adapter.vision_signals(module, x, kwargs)
        if out is not None:
            self._vision_capture.append(out)

    def _on_vision_output(self, module, args, output):
        if self._mute_vision:
            return
        with torch.no_grad():
            out = self.adapter.vision_output_signals(module, output)
        if out:
            self._vision_capture.append(out)

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        """`ImageTokens.project`: the adapter's projector, (k, C) -> (k, D), without feeding the vision hooks."""
        self._mute_vision = True
        try:
            return self.adapter.project_vision(feats)
        finally:
            self._mute_vision = False

    def _on_model_call(self, module, args, kwargs):
        if args:  # HF forwards take input_ids first
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        cache = hf.get_cache(kwargs)
        if hf.cache_length(cache) > 0:
            return self._on_decode(cache, kwargs)
        self._forward = None
        if kwargs.get("mm_encoder_outputs") is None:  # a capture made now belongs to this call
            self._vision_capture.clear()
        return self._on_prefill(kwargs)

    def _after_model_call(self, module, args, output):
        fw = self._forward
        if fw is not None and fw.prefill:
            self._finish_record(fw)
            self.last.selections = _selections(fw)
            cache = hf.output_cache(output)
            cache = fw.cache if cache is None else cache
            if cache is not None:
                fw.prefill = False
                fw.captured.clear()
                self._decode[cache] = fw
        self._forward = None

    # --- prefill ---------------------------------------------------------------------------------
    def _on_prefill(self, kwargs: dict):
        ad = self.adapter
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise UnsupportedInputError(
                "vtprune needs input_ids to locate the image tokens (inputs_embeds alone cannot be pruned)"
            )
        cache = hf.get_cache(kwargs)
        if hf.is_static_cache(cache):
            raise UnsupportedInputError("static (compileable) caches cannot hold per-layer pruned lengths")
        bsz, length = input_ids.shape
        device = input_ids.device
        mask2d = kwargs.get("attention_mask")
        mask2d = torch.ones_like(input_ids) if mask2d is None else mask2d.long()
        is_img = _is_visual(input_ids, ad) & mask2d.bool()
        if self.stages:
            ad.check_inputs(input_ids, kwargs)
        positions = ad.original_positions(input_ids, mask2d, kwargs) if bool(is_img.any()) else None

        images, n_visual, rows_of = self._find_images(input_ids, mask2d, is_img, positions, kwargs)
        prunes = any(img.counts and min(img.counts) < img.n for img in images)
        self.last = None
        if not prunes:
            self._record_passthrough(n_visual, images, mask2d)
            return None
        if kwargs.get("labels") is not None and self.stage_at_layer:
            raise UnsupportedInputError("labels cannot be combined with in-LLM pruning (the output rows change)")
        if self.stage_at_layer:
            guards.refuse_right_padding(mask2d)

        if self.text_wanted or self.needs_suffix_rows:
            self._attach_text_signals(input_ids, mask2d, images)
        next_pos = next_positions(positions, mask2d.bool())
        vis_image = torch.full((bsz, length), -1, dtype=torch.long, device=device)
        vis_index = torch.full_like(vis_image, -1)
        for i, img in enumerate(images):
            rows = rows_of[i]
            vis_image[img.sample, rows] = i
            vis_index[img.sample, rows] = torch.arange(img.n, device=device)
        seq_index = torch.arange(length, device=device).expand(bsz, -1).masked_fill(~mask2d.bool(), -1)
        group = _Group(0, mask2d, positions, vis_image, vis_index, seq_index, next_pos)
        fw = _Forward(True, images, [group], cache, n_visual)
        fw.suffix_rows = self._suffix_rows

        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(ad.text_config, "use_cache", True)
        if use_cache and cache is None:  # create it here so that decode steps can be recognised
            fw.cache = hf.new_dynamic_cache(ad.text_config)
            hf.set_cache(kwargs, fw.cache)

        if self.pre_stage is not None:
            self._prune_before_llm(fw, kwargs)
        group = fw.groups[0]
        kwargs["attention_mask"] = group.mask2d
        kwargs["position_ids"] = group.positions
        self._forward = fw
        return (), kwargs

    def _find_images(self, input_ids, mask2d, is_img, positions, kwargs):
        """Images in prompt order with their budgets and schedules.  -> images, N per sample, visual rows."""
        ad, method = self.adapter, self.method
        images: list[_Image] = []
        rows_of: list[torch.Tensor] = []
        n_visual: list[int] = []
        split = [ad.split_images(is_img[b].nonzero().flatten()) for b in range(input_ids.shape[0])]
        if positions is not None:
            refined = ad.begin_prefill(input_ids, mask2d, positions, split, {**self._generate_kwargs, **kwargs})
            split = split if refined is None else refined
        index = 0
        for b, spans in enumerate(split):
            cands = [ad.candidate_mask(index + j, int(r.numel())) for j, r in enumerate(spans)]
            index += len(spans)
            per_image = [r if c is None else r[c.to(r.device)] for r, c in zip(spans, cands, strict=True)]
            sizes = [int(r.numel()) for r in per_image]
            n_visual.append(sum(sizes))
            if not sizes:
                continue
            budgets = image_budgets(self.budget.tokens_for(sum(sizes)), sizes, b)  # >= 1 token per image
            sample_seed = hash(tuple(input_ids[b][mask2d[b].bool()].tolist()))
            offset = 0
            for j, (rows, n, k) in enumerate(zip(per_image, sizes, budgets, strict=True)):
                if k >= n or not self.stages:
                    counts = [n] * len(self.stages)
                else:
                    counts = method.schedule(n, k, self.budget.mode, ad.num_layers)
                    _check_schedule(method.name, counts, n, len(self.stages))
                grids, coords, crop = ad.image_layout(len(images), n)
                tiles = ad.image_tiles(len(images))
                images.append(
                    _Image(
                        b,
                        offset,
                        n,
                        counts,
                        grids,
                        coords.to(rows.device),
                        crop.to(rows.device),
                        hash((sample_seed, j)) % (2**62),
                        spans[j],
                        None if cands[j] is None else cands[j].to(rows.device),
                        tile=None if tiles is None else tiles.to(rows.device),
                    )
                )
                rows_of.append(rows)
                offset += n
        return images, n_visual, rows_of

    def _prune_before_llm(self, fw: _Forward, kwargs: dict) -> None:
        """`vision`/`pre_llm` stage: select per image, shorten ids, hand pruned features to the model."""
        ad, group = self.adapter, fw.groups[0]
        feats = ad.features_from_kwargs(kwargs)
        if feats is None:
            if all(kwargs.get(name) is None for name in ad.pixel_kwargs):
                raise UnsupportedInputError(
                    f"missing image: the prompt has image tokens but neither {' / '.join(ad.pixel_kwargs)} "
                    "nor mm_encoder_outputs"
                )
            self._vision_capture.clear()
            feats = ad.encode_images(kwargs)
        spans = [int(im.span.numel()) for im in fw.images]
        if len(feats) != len(fw.images) or any(int(f.shape[0]) != n for f, n in zip(feats, spans, strict=False)):
            raise UnsupportedInputError(
                f"the images give {[int(f.shape[0]) for f in feats]} visual tokens but the prompt has "
                f"{spans} image placeholders"
            )
        wanted = self.method.signals(0) & sig.VISION_SIGNALS
        if wanted:
            self._attach_vision_signals(fw.images, wanted)

        keep = group.mask2d.bool() & (group.vis_image < 0)
        extra = torch.zeros_like(group.vis_image)  # (B, L) inserted tokens placed at each row
        project = self._project if "vision_features" in ad.vision_signal_names else None
        new_feats: list[torch.Tensor] = []
        sources: list[torch.Tensor | None] = []  # per image: candidate behind each output token, −1 inserted
        orders: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # image -> (default, plan) token orders
        for i, img in enumerate(fw.images):
            rows = (group.vis_image[img.sample] == i).nonzero().flatten()
            k = img.counts[0]
            if k >= img.n:
                keep[img.sample, rows] = True
                new_feats.append(feats[i])
                sources.append(None)
                continue
            if img.cand is not None:  # structural rows (e.g. newlines) go with the pruned image
                keep[img.sample, img.span[~img.cand]] = False
            visual = feats[i] if img.cand is None else feats[i][img.cand]
            signals = dict(img.signals)
            if "visual_embeddings" in self.text_wanted:
                signals["visual_embeddings"] = visual.float()
            view = ImageTokens(
                visual,
                img.coords,
                img.crop,
                img.grids,
                torch.arange(img.n, device=rows.device),
                signals,
                img.seed,
                img.memo,
                img.question,
                img.tile,
                project,
            )
            plan = self._checked_plan(0, view, k, img)
            keep[img.sample, rows[plan.keep_idx]] = True
            tokens = plan.new_feats.to(visual.dtype) if plan.new_feats is not None else visual[plan.keep_idx]
            default = None
            if plan.n_inserted:  # token ids 0..K−1 kept, K..K+E−1 inserted; inserted first at a shared slot
                extra[img.sample].index_add_(0, rows[plan.insert_at], torch.ones_like(plan.insert_at))
                tokens = torch.cat([tokens, plan.inserted.to(visual.dtype)])
                slot = torch.cat([plan.keep_idx * 2 + 1, plan.insert_at * 2])
                default = torch.sort(slot, stable=True).indices
            if plan.order is not None:
                natural = default if default is not None else torch.arange(len(tokens), device=rows.device)
                orders[i] = (natural, plan.order)
                default = plan.order
            new_feats.append(tokens if default is None else tokens[default])
            src = torch.cat([plan.keep_idx, plan.keep_idx.new_full((plan.n_inserted,), -1)])
            sources.append(src if default is None else src[default])
            self._note_kept(img, 0, plan.keep_idx, plan.n_inserted)

        gather, valid = compact_rows(keep.long() + extra)
        inserted = valid & (copy_rank(gather, valid) < extra.gather(1, gather))
        if orders:  # reference orders: permute each image's slots (ids are reindexed afterwards)
            slots_image = group.vis_image.gather(1, gather).masked_fill(~valid, -1)
            for i, (default, order) in orders.items():
                b = fw.images[i].sample
                slots = (slots_image[b] == i).nonzero().flatten()
                at = torch.empty_like(default)
                at[default] = torch.arange(len(default), device=default.device)  # token id -> its default slot
                src = slots[at[order]]
                gather[b, slots] = gather[b, src]
                inserted[b, slots] = inserted[b, src]
        self._push_group(fw, 0, gather, valid, inserted)
        ids = kwargs["input_ids"].gather(1, gather).masked_fill(~valid, ad.pad_token_id)
        kwargs["input_ids"] = ids
        for name in ad.image_kwargs:
            kwargs.pop(name, None)
        ad.note_kept_rows(sources)
        kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), **ad.features_to_kwargs(new_feats)}
        if kwargs.get("labels") is not None:
            kwargs["labels"] = kwargs["labels"].gather(1, gather).masked_fill(~valid | inserted, -100)
        for name in ("token_type_ids", "mm_token_type_ids"):
            if kwargs.get(name) is not None:
                kwargs[name] = kwargs[name].gather(1, gather) * valid

    def _special_ids(self) -> set[int]:
        cfg, tc = self.model.config, self.adapter.text_config
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        ids = {int(getattr(cfg, n)) for n in names if isinstance(getattr(cfg, n, None), int)}
        for n in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(tc, n, None)
            ids.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
        if self._tokenizer is not None:
            ids.update(int(i) for i in self.tokenizer.all_special_ids)
        return ids

    def _attach_text_signals(self, input_ids: torch.Tensor, mask2d: torch.Tensor, images: list[_Image]) -> None:
        """Question-span rows and text signals per sample (spec README §3), shared by the sample's images."""
        wanted = self.text_wanted
        embed = self.model.get_input_embeddings()
        special = torch.tensor(sorted(self._special_ids()), dtype=torch.long, device=input_ids.device)
        tok = self.tokenizer if (wanted & {"noun_embeddings", "question_text"} or self._tokenizer is not None) else None
        self._suffix_rows = []
        for b in range(input_ids.shape[0]):
            mine = [im for im in images if im.sample == b]
            valid = mask2d[b].bool().nonzero().flatten()
            start = int(mine[-1].span[-1]) + 1 if mine else int(valid[0])
            rows = valid[valid >= start]
            if self.generation_start is not None:  # prompt + generated ids: the span ends at the last prompt row
                rows = rows[rows <= self.generation_start]
            self._suffix_rows.append(rows)
            if not mine:
                continue
            ids = input_ids[b, rows]
            q_ids = ids[~torch.isin(ids, special)]
            if tok is not None and q_ids.numel():
                keep = strip_generation_header([tok.decode([int(i)]) for i in q_ids.tolist()])
                q_ids = q_ids[:keep]
            out: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                if "suffix_embeddings" in wanted:
                    out["suffix_embeddings"] = embed(ids).float()
                if "question_embeddings" in wanted:
                    out["question_embeddings"] = embed(q_ids).float()
                question = tok.decode(q_ids.tolist(), skip_special_tokens=True).strip() if tok is not None else None
                if "noun_embeddings" in wanted:
                    nouns = question_nouns(question or "")
                    rows_ = []
                    for noun in nouns:
                        sub = tok(" " + noun, add_special_tokens=False)["input_ids"]
                        if sub:
                            rows_.append(embed(torch.tensor(sub, device=ids.device)).float().mean(0))
                    width = embed.weight.shape[1]
                    out["noun_embeddings"] = torch.stack(rows_) if rows_ else torch.zeros(0, width, device=ids.device)
            for im in mine:
                im.signals.update(out)
                im.question = question if "question_text" in wanted else None

    def _attach_visual_embeddings(self, fw: _Forward, hidden: torch.Tensor) -> None:
        """From layer 0's input: each image's candidate rows, indexed by original candidate index."""
        group = fw.groups[0]
        for i, img in enumerate(fw.images):
            rows = (group.vis_image[img.sample] == i).nonzero().flatten()
            emb = torch.zeros(img.n, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
            emb[group.vis_index[img.sample, rows]] = hidden[img.sample, rows].float()
            img.embeddings = emb

    def _attach_vision_signals(self, images: list[_Image], wanted: frozenset[str]) -> None:
        captured = self._vision_capture
        self._vision_capture = []
        if not captured:
            raise UnsupportedInputError(
                f"method {self.method.name!r} needs vision-encoder signals {sorted(wanted)}: pass pixel_values "
                "(precomputed mm_encoder_outputs carry none)"
            )
        captured = self.adapter.collate_vision_signals(captured)
        missing = sorted(n for n in wanted if not any(n in c for c in captured))
        if missing:
            raise UnsupportedInputError(f"{type(self.model).__name__} does not provide the vision signals {missing}")
        merged = {name: [t for c in captured if name in c for t in c[name]] for name in wanted}  # per image
        if len(next(iter(merged.values()))) != len(images):
            raise UnsupportedInputError(
                f"vision signals were captured for {len(next(iter(merged.values())))} images but the batch "
                f"has {len(images)} (beam search / num_return_sequences with vision-stage methods is unsupported)"
            )
        for i, img in enumerate(images):
            img.signals.update({name: t[i] for name, t in merged.items()})

    # --- in-LLM stages ---------------------------------------------------------------------------
    def _on_layer(self, idx: int, layer: nn.Module, args, kwargs):
        fw = self._forward
        if fw is None:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        stage = self.stage_at_layer.get(idx)
        if stage is not None:
            if fw.prefill:
                hidden = self._prune_in_llm(fw, stage, idx, layer, hidden, kwargs)
            else:
                self._step_group(fw, idx, hidden, kwargs)
        group = fw.group_for(idx)
        if group.in_llm:
            kind = self._kind_of[idx]
            kwargs["attention_mask"] = group.mask[kind]
            kwargs["position_embeddings"] = group.pos_emb[kind]
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = group.step_positions if not fw.prefill else group.positions
        if fw.prefill and idx == 0 and self.capture_layer0:
            self._attach_visual_embeddings(fw, hidden)
        if fw.prefill and idx in self.capture_layers:
            fw.captured[idx] = (layer, hidden, kwargs["position_embeddings"], group.mask2d)
        return (hidden,) + tuple(args[1:]), kwargs

    def _llm_signals(self, fw: _Forward, stage: int, layer_idx: int, here: tuple) -> dict[str, torch.Tensor]:
        """Signals over the rows of the current group, each (B, L) fp32, computed from layer k−1 (or, for
        `layer_last_token_attention`, from layer k itself: here = (layer, hidden, pos_emb, mask2d) of layer k)."""
        wanted = self.method.signals(stage) & sig.LLM_SIGNALS
        if not wanted:
            return {}
        out: dict[str, torch.Tensor] = {}
        own = wanted & sig.OWN_LAYER_SIGNALS
        if own:
            with torch.no_grad():
                out.update(self._own_layer_signals(fw, here, own))
            wanted = wanted - own
            if not wanted:
                return out
        prev, hidden, pos_emb, mask2d = fw.captured[layer_idx - 1]
        keys = hf.cache_keys(fw.cache, layer_idx - 1)
        if keys is not None and keys.shape[2] != hidden.shape[1]:
            keys = None
        with torch.no_grad():
            if "last_token_attention" in wanted:
                out["last_token_attention"] = sig.last_token_attention(
                    self.adapter, prev, hidden, pos_emb, mask2d, keys
                )
            if "mean_received_attention" in wanted:
                out["mean_received_attention"] = sig.mean_received_attention(
                    self.adapter, prev, hidden, pos_emb, mask2d, keys
                )
            suffix = wanted & {"suffix_attention", "suffix_attention_heads", "suffix_rope_gravity"}
            if suffix:
                out.update(self._suffix_attention(fw, prev, hidden, pos_emb, mask2d, keys, suffix))
            if "key_norms" in wanted:
                if keys is None:
                    _, keys, _ = self.adapter.query_key_states(prev, hidden, pos_emb, torch.zeros_like(mask2d[:, :1]))
                out["key_norms"] = sig.key_norms(keys)
        return out

    def _own_layer_signals(self, fw: _Forward, here: tuple, wanted: frozenset[str]) -> dict:
        """In-layer signals from layer k's own input (here = (layer, hidden, pos_emb, mask2d) of layer k): per
        sample `layer_last_token_attention` (L,), `layer_suffix_attention` (T_s, L), `layer_normed_features`
        (L, D) fp32 and `layer_normed_suffix` (T_s, D) fp32."""
        layer, hidden, pos_emb, mask2d = here
        out: dict = {}
        if "layer_last_token_attention" in wanted:
            out["layer_last_token_attention"] = sig.last_token_attention(self.adapter, *here)
        if "layer_suffix_attention" in wanted:
            probs = self._suffix_attention(fw, layer, hidden, pos_emb, mask2d, None)["suffix_attention"]
            out["layer_suffix_attention"] = probs
        if wanted & {"layer_normed_features", "layer_normed_suffix"}:
            normed = self.adapter.input_norm(layer, hidden).float()  # (B, L, D)
            if "layer_normed_features" in wanted:
                out["layer_normed_features"] = normed
            if "layer_normed_suffix" in wanted:
                out["layer_normed_suffix"] = [normed[b, r] for b, r in enumerate(self._suffix_row_index(fw))]
        return out

    def _suffix_row_index(self, fw: _Forward) -> list[torch.Tensor]:
        """Per sample: the current group's row of each question-span input row (T_s,) int64."""
        group = fw.groups[-1]
        return [  # text rows are never pruned: each question-span input row is present in the group
            (group.seq_index[b][None, :] == wanted.to(group.seq_index.device)[:, None]).float().argmax(1)
            for b, wanted in enumerate(fw.suffix_rows)
        ]

    def _suffix_attention(
        self, fw: _Forward, layer, hidden, pos_emb, mask2d, keys, wanted=frozenset({"suffix_attention"})
    ) -> dict[str, list[torch.Tensor]]:
        """Question-span signals of the current group's rows, per sample: `suffix_attention` (T_s, L) head-mean
        attention of the question-span rows over all rows, `suffix_attention_heads` (H, T_s, L) per query head
        (one computation serves both), `suffix_rope_gravity` (T_s, L) `signals.rope_gravity` of the rows' and
        all rows' position ids (the group's ids, i.e. those layer k−1's RoPE used)."""
        group = fw.groups[-1]
        rows = self._suffix_row_index(fw)
        width = max(1, max(int(r.numel()) for r in rows))
        padded = torch.full((len(rows), width), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
        ok = torch.zeros(len(rows), width, dtype=torch.bool, device=hidden.device)
        for b, r in enumerate(rows):
            padded[b, : r.numel()] = r
            ok[b, : r.numel()] = True
        out: dict[str, list[torch.Tensor]] = {}
        if "suffix_attention_heads" in wanted:
            heads = sig.rows_attention(self.adapter, layer, hidden, pos_emb, mask2d, padded, ok, keys, heads=True)
            out["suffix_attention_heads"] = [heads[b, :, : r.numel()] for b, r in enumerate(rows)]  # (H, T_s, L)
            if "suffix_attention" in wanted:
                probs = heads.mean(1)  # (B, q, L), the same numbers as the head-mean path
                out["suffix_attention"] = [probs[b, : r.numel()] for b, r in enumerate(rows)]
        elif "suffix_attention" in wanted:
            probs = sig.rows_attention(self.adapter, layer, hidden, pos_emb, mask2d, padded, ok, keys)  # (B, q, L)
            out["suffix_attention"] = [probs[b, : r.numel()] for b, r in enumerate(rows)]
        if "suffix_rope_gravity" in wanted:
            spec = self.adapter.rotary_spec()
            pos = group.positions  # (B, L) or (R, B, L)
            out["suffix_rope_gravity"] = [
                sig.rope_gravity(
                    pos[..., b, r], pos[..., b, :], spec.theta, spec.head_dim, spec.sections, spec.pair_rows
                )
                for b, r in enumerate(rows)
            ]
        return out

    def _prune_in_llm(self, fw: _Forward, stage: int, idx: int, layer, hidden, kwargs) -> torch.Tensor:
        group = fw.groups[-1]
        adaptive = self.method.adaptive_count  # the method decides the count: `select` runs for every pruned image
        if not adaptive and all(img.counts[stage] >= (img.counts[stage - 1] if stage else img.n) for img in fw.images):
            return hidden  # nobody prunes here: keep the rows (and numerics) exactly as they are
        here_pos = group.pos_emb[self._kind_of[idx]] if group.in_llm else kwargs["position_embeddings"]
        signals = self._llm_signals(fw, stage, idx, (layer, hidden, here_pos, group.mask2d))
        keep = group.mask2d.bool() & (group.vis_image < 0)
        replaced = None
        orders: dict[int, torch.Tensor] = {}  # image -> its plan's output order (a reference order)
        for i, img in enumerate(fw.images):
            rows = (group.vis_image[img.sample] == i).nonzero().flatten()
            k = img.counts[stage]
            if k >= (img.n if adaptive else rows.numel()):
                keep[img.sample, rows] = True
                continue
            orig = group.vis_index[img.sample, rows]
            view_signals = {}
            for name, s in signals.items():
                if name in sig.SAMPLE_SIGNALS:
                    view_signals[name] = s[img.sample]
                elif name in sig.ROW_SIGNALS:
                    view_signals[name] = s[img.sample][rows]
                else:
                    view_signals[name] = s[img.sample][..., rows]
            for name in self.method.signals(stage) & (sig.TEXT_SIGNALS | sig.VISION_SIGNALS):
                if name in img.signals:  # vision signals are per original candidate, text ones per sample
                    value = img.signals[name]
                    per_candidate = name in sig.VISION_SIGNALS - sig.VIEW_SIGNALS
                    view_signals[name] = value[orig] if per_candidate else value
            if img.embeddings is not None:
                view_signals["visual_embeddings"] = img.embeddings[orig]
            view = ImageTokens(
                hidden[img.sample, rows],
                img.coords[orig],
                img.crop[orig],
                img.grids,
                orig,
                view_signals,
                img.seed,
                img.memo,
                img.question,
                None if img.tile is None else img.tile[orig],
            )
            plan = self._checked_plan(stage, view, k, img)
            kept_rows = rows[plan.keep_idx]
            keep[img.sample, kept_rows] = True
            if plan.new_feats is not None:
                replaced = hidden.clone() if replaced is None else replaced
                replaced[img.sample, kept_rows] = plan.new_feats.to(hidden.dtype)
            if plan.order is not None:
                orders[i] = plan.order
            self._note_kept(img, stage, orig[plan.keep_idx])
        hidden = replaced if replaced is not None else hidden

        gather, valid = compact_rows(keep)
        if orders:  # each image's kept rows sit in its slots in row order; the plan's order permutes them
            slots_image = group.vis_image.gather(1, gather).masked_fill(~valid, -1)
            for i, order in orders.items():
                b = fw.images[i].sample
                slots = (slots_image[b] == i).nonzero().flatten()
                gather[b, slots] = gather[b, slots[order]]
        new = self._push_group(fw, idx, gather, valid)
        new.in_llm = True
        hidden = gather_rows(hidden, gather)
        here = self._kind_of[idx]
        for kind in self._kinds:  # one (cos, sin) and mask per layer kind (one kind for most models)
            if self._rule_at[idx] == "keep" and (group.in_llm or kind == here):  # the rows' own (cos, sin), gathered
                source = group.pos_emb[kind] if group.in_llm else kwargs["position_embeddings"]
                cos, sin = (t.expand(gather.shape[0], *t.shape[1:]) for t in source)
                new.pos_emb[kind] = (gather_rows(cos, gather), gather_rows(sin, gather))
            else:
                new.pos_emb[kind] = self.adapter.rotary(hidden, new.positions, kind)
            new.mask[kind] = self.adapter.layer_mask(
                hidden, new.mask2d, fw.cache, self._first_of_kind(idx, kind), blocks=new.vis_image
            )
        return hidden

    def _first_of_kind(self, idx: int, kind) -> int:
        """The first decoder layer at or after `idx` of `kind` (its cache sizes the mask), else `idx`."""
        return next((i for i in range(idx, len(self._kind_of)) if self._kind_of[i] == kind), idx)

    def _push_group(
        self, fw: _Forward, start: int, gather: torch.Tensor, valid: torch.Tensor, inserted: torch.Tensor | None = None
    ) -> _Group:
        """Gather the current group's row metadata into a new group starting at layer `start`.

        inserted (B, L') bool: slots holding inserted tokens (copies of their slot's row: same image, position
        id and input row; no candidate index)."""
        old = fw.groups[-1]
        positions = gather_positions(old.positions, gather)
        visual = gather_rows(old.vis_image, gather).masked_fill(~valid, -1)
        if self._rule_at[start] == "reindex":
            ids = self.adapter.reindex_positions(positions, valid, visual >= 0)
            if self.positions == "reindex" or start == 0:
                next_pos = next_positions(ids, valid)
            else:  # per-stage rules, in-LLM: decoding keeps layer 0's ids, so do generated rows of an uncached replay
                next_pos = old.next_pos
                if self.generation_start is not None:
                    generated = gather_rows(old.seq_index, gather) > self.generation_start
                    ids = torch.where(generated if ids.dim() == 2 else generated[None], positions, ids)
            positions = ids
        else:
            positions = positions * (valid if positions.dim() == 2 else valid[None])
            next_pos = old.next_pos
        new = _Group(
            start,
            valid.long(),
            positions,
            visual,
            gather_rows(old.vis_index, gather).masked_fill(~valid if inserted is None else ~valid | inserted, -1),
            gather_rows(old.seq_index, gather).masked_fill(~valid, -1),
            next_pos,
        )
        if start == 0:
            fw.groups[0] = new
        else:
            fw.groups.append(new)
        return new

    # --- decode ----------------------------------------------------------------------------------
    def _on_decode(self, cache, kwargs: dict):
        fw = self._decode.get(cache)
        if fw is None:  # a cache this session did not prune (bypassed or unpatched prefill): stock path
            self._forward = None
            return None
        ids = kwargs.get("input_ids")
        if ids is None:
            raise UnsupportedInputError("vtprune needs input_ids when continuing a pruned cache")
        if _is_visual(ids, self.adapter).any():
            raise UnsupportedInputError("a new image in a later turn of a pruned conversation is not supported")
        q = ids.shape[1]
        given = kwargs.get("attention_mask")
        cols = given[:, -q:].long() if given is not None else torch.ones_like(ids)
        rows = self.adapter.position_rows
        for g in fw.groups:
            g.mask2d = torch.cat([g.mask2d, cols], dim=1)
            g.step_positions = step_positions(g.next_pos, q, rows)
            g.next_pos = g.next_pos + q
        first = fw.groups[0]
        kwargs["attention_mask"] = first.mask2d
        kwargs["position_ids"] = first.step_positions
        self.adapter.check_decode(first.step_positions)
        self._forward = fw
        return (), kwargs

    def _step_group(self, fw: _Forward, idx: int, hidden, kwargs) -> None:
        """Decode step at a stage layer: rebuild the group's mask (and rope for `reindex`)."""
        group = next((g for g in fw.groups if g.start == idx), None)
        if group is None:  # nobody pruned at this stage in this prefill: the layer runs on the previous group
            return
        here = self._kind_of[idx]
        for kind in self._kinds:
            if self.positions != "reindex" and kind == here:  # every group decodes at layer 0's ids
                group.pos_emb[kind] = kwargs["position_embeddings"]
            else:
                group.pos_emb[kind] = self.adapter.rotary(hidden, group.step_positions, kind)
            group.mask[kind] = self.adapter.layer_mask(hidden, group.mask2d, fw.cache, self._first_of_kind(idx, kind))

    # --- injected features (DeepStack) -----------------------------------------------------------
    def _on_injection_call(self, module, args, kwargs):
        """Pre-hook of the adapter's `injection_module` at a pruned prefill: take the per-row features the model
        would add after its `injection_layers` out of the stock loop (`_on_injection_layer` re-adds them)."""
        fw = self._forward
        if fw is None or not fw.prefill:
            return None
        fw.injection = self.adapter.take_injections(kwargs)
        return args, kwargs

    def _on_injection_layer(self, idx: int, layer: nn.Module, args, output):
        """Forward hook of an injection layer: the adapter adds its features on the rows of the current group
        (rows an in-LLM stage dropped get nothing; the others exactly the stock sum)."""
        fw = self._forward
        if fw is None or not fw.prefill or fw.injection is None:
            return None
        x = output[0] if isinstance(output, tuple) else output
        first, seq = fw.groups[0].seq_index, fw.group_for(idx).seq_index  # (B, L0), (B, L') input rows
        pad = int(first.max()) + 1  # one spare column for padding rows
        inv = torch.full((first.shape[0], pad + 1), -1, dtype=torch.long, device=first.device)
        lm = torch.arange(first.shape[1], device=first.device).expand_as(first)
        inv.scatter_(1, first.masked_fill(first < 0, pad), lm.masked_fill(first < 0, -1))
        inv[:, pad] = -1
        lm_rows = inv.gather(1, seq.masked_fill(seq < 0, pad))  # (B, L') language-model input row, −1 padding
        new = self.adapter.inject(fw.injection, idx, x, lm_rows)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    # --- repair ----------------------------------------------------------------------------------
    def _on_layer_output(self, idx: int, layer: nn.Module, args, output):
        """Forward hook of a repair layer: `method.repair(idx, rows (R, D), memos)` per sample on its generation
        rows (prefill: the last prompt row, or rows from `generation_start` on; decode: every new row); other
        rows stay bit-identical. Samples without an image are left alone; bypassed (unpruned) prefills too."""
        fw = self._forward
        if fw is None:
            return None
        x = output[0] if isinstance(output, tuple) else output
        if fw.prefill:
            seq = fw.group_for(idx).seq_index  # (B, L) input row of each row, −1 on padding
            if self.generation_start is None:
                gate = (seq == seq.max(1, keepdim=True).values) & (seq >= 0)
            else:
                gate = seq >= self.generation_start
        else:
            gate = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        new = None
        for b in range(x.shape[0]):
            memos = [im.memo for im in fw.images if im.sample == b]
            rows = gate[b].nonzero().flatten()
            if not memos or rows.numel() == 0:
                continue
            fixed = self.method.repair(idx, x[b, rows], memos)
            if fixed is None:
                continue
            new = x.clone() if new is None else new
            new[b, rows] = fixed.to(x.dtype)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    # --- helpers ---------------------------------------------------------------------------------
    def _checked_plan(self, stage: int, view: ImageTokens, k: int, img: _Image) -> KeepPlan:
        call = SelectCall.start(stage, view.features.device)
        plan = self.method.select(stage, view, k)
        call.stop()
        img.selections.append(call)
        idx = plan.keep_idx
        n = view.n
        if idx.dim() != 1 or idx.dtype != torch.long:
            raise VtpruneError(f"{self.method.name}: keep_idx must be a 1-D int64 tensor")
        if idx.numel() and (idx[0] < 0 or idx[-1] >= n or (idx[1:] <= idx[:-1]).any()):
            raise VtpruneError(f"{self.method.name}: keep_idx must be sorted, unique and within [0, {n})")
        name = self.method.name
        extra = plan.n_inserted
        if self.method.exact_count and idx.numel() + extra != k:
            more = f" + {extra} inserted" if extra else ""
            raise VtpruneError(f"{name}: returned {idx.numel()}{more} tokens, scheduled {k}")
        if plan.new_feats is not None and plan.new_feats.shape[0] != idx.numel():
            raise VtpruneError(f"{name}: new_feats has {plan.new_feats.shape[0]} rows for {idx.numel()}")
        device = view.features.device
        plan.keep_idx = idx.to(device)
        pre_llm = self.stages[stage].before_llm
        if plan.inserted is not None:
            at = plan.insert_at
            if not self.method.inserts or not pre_llm:
                raise VtpruneError(
                    f"{name}: inserted tokens need a method with inserts = True at a vision/pre_llm stage"
                )
            if (
                at is None
                or at.dim() != 1
                or at.dtype != torch.long
                or at.numel() != extra
                or plan.inserted.dim() != 2
                or plan.inserted.shape[1] != view.features.shape[1]
                or (extra and (at[0] < 0 or at[-1] >= n or (at[1:] < at[:-1]).any()))
            ):
                raise VtpruneError(
                    f"{name}: inserted must be (E, {view.features.shape[1]}) with insert_at (E,) int64 non-decreasing "
                    f"candidate indices in [0, {n})"
                )
            plan.insert_at = at.to(device)
        if plan.order is not None:
            total = idx.numel() + extra
            order = plan.order
            if self.positions != "reindex":
                raise VtpruneError(f"{name}: an output `order` needs positions='reindex' (a reference order's ids)")
            if (
                order.dtype != torch.long
                or order.shape != (total,)
                or not torch.equal(order.sort().values.cpu(), torch.arange(total))
            ):
                raise VtpruneError(f"{name}: order must be a permutation of the {total} output tokens")
            plan.order = order.to(device)
        if plan.new_feats is not None:  # which kept tokens carry merged features (the record's `merged_idx`)
            differs = (plan.new_feats != view.features[plan.keep_idx].to(plan.new_feats.dtype)).any(-1)
            img.merged_rows[stage] = view.original_index[plan.keep_idx][differs]
        return plan

    def _note_kept(self, img: _Image, stage: int, kept: torch.Tensor, inserted: int = 0) -> None:
        img.kept[stage] = kept.detach().to("cpu", torch.long).sort().values  # rows may be in a reference order
        if inserted:
            img.inserted[stage] = inserted
        if self.method.merges:
            img.merged.add(stage)

    def _finish_record(self, fw: _Forward) -> None:
        """Per-sample visual counts entering each layer (from the groups) and kept indices per stage."""
        visual = {g.start: ((g.vis_image >= 0) & g.mask2d.bool()).sum(1) for g in fw.groups}  # (B,) per group
        per_layer = torch.stack(
            [visual[fw.group_for(layer).start] for layer in range(self.adapter.num_layers)], dim=1
        ).tolist()  # (B, L)
        text = (fw.groups[0].mask2d.bool() & (fw.groups[0].vis_image < 0)).sum(1).tolist()
        samples = []
        for b, n in enumerate(fw.n_visual):
            mine = [im for im in fw.images if im.sample == b]
            events = []
            for s, stage in enumerate(self.stages):
                parts = []
                for im in mine:
                    prev = next((im.kept[t] for t in range(s, -1, -1) if t in im.kept), torch.arange(im.n))
                    parts.append(prev + im.offset)
                idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
                inserted = [sum(im.inserted.get(t, 0) for t in range(s + 1)) for im in mine]
                merged_idx = torch.cat([_merged_kept(im, s) for im in mine]) if mine else idx[:0]
                events.append(PruningEvent(str(stage), idx, any(s in im.merged for im in mine), inserted, merged_idx))
            notes = [im.memo.get("record") for im in mine]
            samples.append(SampleRecord(n, int(text[b]), per_layer[b], events, [im.offset for im in mine] + [n], notes))
        self.last = RunRecord(
            self.method.name,
            str(self.budget),
            self.positions,
            samples,
            self.dims,
            _bytes_per_elem(self.model),
            fw.groups[-1].seq_index,
            _method_info(self.method),
        )

    def _record_passthrough(self, n_visual: list[int], images: list[_Image], mask2d: torch.Tensor) -> None:
        """Unpruned prefill: the record still carries N, n̄ = N, FLOPs and KV bytes."""
        self._forward = None
        valid = mask2d.sum(1).tolist()
        samples = []
        for b, n in enumerate(n_visual):
            offsets = [im.offset for im in images if im.sample == b] + [n]
            events = [PruningEvent(str(s), torch.arange(n), False, [0] * (len(offsets) - 1)) for s in self.stages]
            samples.append(SampleRecord(n, int(valid[b]) - n, [n] * self.adapter.num_layers, events, offsets,
                                        [None] * (len(offsets) - 1)))
        self.last = RunRecord(
            self.method.name, str(self.budget), self.positions, samples, self.dims, _bytes_per_elem(self.model), None,
            _method_info(self.method),
        )


def _selections(fw: _Forward) -> list[SelectCall]:
    """The prefill's `select` calls, each with its sample and image index in the sample."""
    out, per_sample = [], {}
    for im in fw.images:
        index = per_sample[im.sample] = per_sample.get(im.sample, -1) + 1
        for call in im.selections:
            call.sample, call.image = im.sample, index
            out.append(call)
    return out


def _merged_kept(im: _Image, stage: int) -> torch.Tensor:
    """(M,) sorted sample-level indices of the image's tokens kept after `stage` whose rows are merges (a plan
    gave them new features at `stage` or before)."""
    merged = [im.merged_rows[t].cpu() for t in range(stage + 1) if t in im.merged_rows]
    if not merged:
        return torch.zeros(0, dtype=torch.long)
    kept = next((im.kept[t] for t in range(stage, -1, -1) if t in im.kept), torch.arange(im.n))
    return kept[torch.isin(kept, torch.cat(merged))] + im.offset


def _is_visual(input_ids: torch.Tensor, adapter: ModelAdapter) -> torch.Tensor:
    """(B, L) bool: rows holding one of the adapter's visual placeholder ids."""
    ids = torch.tensor(adapter.visual_token_ids, dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, ids)


def _method_info(method) -> dict | None:
    """The method's run-level record (`record_info()`, optional on a method), or None."""
    info = getattr(method, "record_info", None)
    return info() if callable(info) else None


def _bytes_per_elem(model: nn.Module) -> int:
    try:
        return next(model.parameters()).element_size()
    except StopIteration:  # pragma: no cover
        return 2


def _check_stage_order(name: str, stages: tuple[Stage, ...]) -> None:
    for i, s in enumerate(stages):
        if s.before_llm and i != 0:
            raise VtpruneError(f"method {name!r}: only the first stage may act before the LLM")
    layers = [s.layer for s in stages if s.kind == "llm"]
    if layers != sorted(set(layers)):
        raise VtpruneError(f"method {name!r}: in-LLM stages must be at strictly increasing layers, got {layers}")


def _check_schedule(name: str, counts: list[int], n: int, n_stages: int) -> None:
    if (
        len(counts) != n_stages
        or any(c < 1 for c in counts)
        or any(b > a for a, b in zip([n, *counts], counts, strict=False))
    ):
        raise VtpruneError(f"method {name!r} produced an invalid schedule {counts} for {n} tokens")
