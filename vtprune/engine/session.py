"""`PruningSession`: the hooks of one patched model instance, coordinating the engine's parts.

One session is attached to one model instance (`model._vtprune`). Where its hooks go is decided once
(`plan.HookPlan`); what each hook does lives in its own module:

- model forward pre-hook, prefill: find the images and their schedules (`prefill`), read the question span
  (`question`), run the `vision`/`pre_llm` stage (`pre_llm`: shortened ids + pruned `mm_encoder_outputs`);
- model forward pre-hook, decode: pruned padding mask and position ids for the cache it pruned (`decode`);
- decoder-layer pre-hooks from the first `llm:k` stage on (`in_llm`: select, compact, per-group mask and RoPE;
  signals from `llm_signals`);
- forward hooks rewriting layer outputs (`outputs`: DeepStack injections under in-LLM pruning, a method's repair);
- vision-tower hooks for vision signals (`vision`), the per-image `select` step shared by every stage (`select`);
- model forward hook: the `RunRecord` (`recording`), and the prefill's state kept for its cache (`state`);
- a per-instance `generate` guard that refuses static caches and chunked prefill, and a thread guard (`guards`).

`remove()` takes all of it away again; no class is patched and no weight or config is touched.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from .. import hf_compat as hf
from ..budget import Budget
from ..contract.method import BudgetRequest, PruningMethod, Stage
from ..errors import UnsupportedInputError
from ..measurement.flops import LLMDims
from ..models.base import ModelAdapter
from ..record import RunRecord
from . import guards
from . import signals as sig
from .decode import begin_step, is_visual
from .in_llm import InLLMPath
from .outputs import inject, repair
from .plan import POSITION_POLICIES, HookPlan, check_positions
from .pre_llm import prune_before_llm
from .prefill import find_images, first_group
from .question import QuestionReader
from .recording import RecordContext, passthrough_record, pruned_record
from .select import Selector
from .state import ForwardState
from .vision import VisionCapture

__all__ = ["POSITION_POLICIES", "CallOptions", "PruningSession"]


@dataclass(frozen=True, kw_only=True)
class CallOptions:
    """What the session knows about the call in progress beyond the forward's own kwargs."""

    #: the adapter's `layout_kwargs` given to the enclosing `generate` (the stock loop drops some of them)
    layout_kwargs: dict = field(default_factory=dict)
    #: an uncached replay of prompt + generated ids: the input row from which rows are generation rows
    #: (`PruningSession.generated_rows_from`), else None
    generation_start: int | None = None


class PruningSession:
    """Physical visual-token pruning on one model instance.

    Public attributes: `model`, `adapter`, `method`, `budget`, `positions`, `stages` (the method's), `plan`
    (`HookPlan`: where the hooks go), `last` (the `RunRecord` of the last prefill, `vtprune.last_run`)."""

    def __init__(
        self,
        *,
        model: nn.Module,
        adapter: ModelAdapter,
        method: PruningMethod,
        budget: Budget,
        positions: str = "keep",
        tokenizer=None,
    ) -> None:
        check_positions(positions)
        self.model, self.adapter, self.method = model, adapter, method
        self.budget, self.positions = budget, positions
        _refuse_input_transform(model, adapter, method)
        _describe_model(method, model, adapter, budget)
        method.bind(adapter.num_layers)  # called here: a method's warnings name the caller of `vtprune.apply`
        self.plan = HookPlan.build(model=model, adapter=adapter, method=method, positions=positions)
        self.stages: tuple[Stage, ...] = self.plan.stages
        self.question = QuestionReader(
            model=model, adapter=adapter, method_name=method.name, wanted=self.plan.text_wanted, tokenizer=tokenizer
        )
        self.vision = VisionCapture(adapter=adapter, method_name=method.name, model_name=type(model).__name__)
        self.selector = Selector(
            method=method, before_llm=tuple(s.before_llm for s in self.stages), reindex_all=self.plan.reindex_all
        )
        self.in_llm = InLLMPath(adapter=adapter, plan=self.plan, selector=self.selector)
        self.recorder = RecordContext(
            model=model,
            method=method,
            budget=budget,
            positions=positions,
            stages=self.stages,
            num_layers=adapter.num_layers,
            dims=LLMDims.from_config(adapter.text_config),
        )
        self.last: RunRecord | None = None
        self._options = CallOptions()
        self._handles: list = []
        self._forward: ForwardState | None = None  # the call in progress (prefill or decode step)
        self._decode: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its prefill's state
        _check_nominal_budget(adapter, method, budget, self.stages)

    # --- installation ----------------------------------------------------------------------------
    def install(self) -> None:
        m, ad, plan = self.model, self.adapter, self.plan
        self._handles.append(m.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(m.register_forward_hook(self._after_model_call))
        if plan.stage_at_layer:
            for idx in range(plan.first_hooked_layer, ad.num_layers):
                hook = partial(self._on_layer, idx)
                self._handles.append(ad.layers[idx].register_forward_pre_hook(hook, with_kwargs=True))
        for idx in plan.repair_layers:
            self._handles.append(ad.layers[idx].register_forward_hook(partial(self._on_layer_output, idx)))
        if plan.stage_at_layer and ad.injection_layers():  # e.g. DeepStack under in-LLM pruning
            owner = ad.injection_module()
            self._handles.append(owner.register_forward_pre_hook(self._on_injection_call, with_kwargs=True))
            for idx in ad.injection_layers():
                self._handles.append(ad.layers[idx].register_forward_hook(partial(self._on_injection_layer, idx)))
        if plan.needs_vision:
            self.vision.install(self._handles)
        stock_generate = m.generate
        m.__dict__["generate"] = partial(self._guarded_generate, stock_generate)
        guards.install_thread_guard(m, self._handles)  # one call at a time per patched model (issue 20)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.model.__dict__.pop("generate", None)
        self._forward = None
        self._decode = weakref.WeakKeyDictionary()
        self.vision.clear()

    # --- options and inspection ------------------------------------------------------------------
    @contextmanager
    def generated_rows_from(self, row: int) -> Iterator[None]:
        """Inside the block, treat every input row with index >= `row` as a generation row.

        For uncached references over prompt + generated ids (`model(**prompt_plus_generated, use_cache=False)`)
        with `row` = the prompt length − 1: the method's repair (`repair_layers`) rewrites those rows, as cached
        decoding does for the new rows; the question span ends at `row` (the last prompt row), so the in-LLM
        signals are those of the prompt alone; under per-stage position rules, rows after `row` keep layer 0's
        ids at in-LLM "reindex" events, as cached decoding gives them."""
        before = self._options
        self._options = replace(before, generation_start=int(row))
        try:
            yield
        finally:
            self._options = before

    def state_for(self, cache) -> ForwardState | None:
        """The prefill state a pruned cache is decoded with (its row groups, images), or None (diagnostics/tests)."""
        return self._decode.get(cache)

    def _guarded_generate(self, stock_generate, *args, **kwargs):
        gc = kwargs.get("generation_config") or self.model.generation_config
        problem = hf.generation_cache_problem(kwargs, gc)
        if problem is not None:
            raise UnsupportedInputError(problem)
        self.vision.clear()
        before = self._options
        layout = {n: kwargs[n] for n in self.adapter.layout_kwargs if kwargs.get(n) is not None}
        self._options = replace(before, layout_kwargs=layout)
        try:
            return stock_generate(*args, **kwargs)
        finally:
            self._options = before

    # --- model hooks -----------------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs):
        if args:  # HF forwards take input_ids first
            kwargs = {"input_ids": args[0], **kwargs}
            args = ()
        cache = hf.get_cache(kwargs)
        if hf.cache_length(cache) > 0:
            fw = self._decode.get(cache)
            if fw is None:  # a cache this session did not prune (bypassed or unpatched prefill): stock path
                self._forward = None
                return None
            kwargs = begin_step(fw, kwargs, adapter=self.adapter)
            self._forward = fw
            return (), kwargs
        self._forward = None
        if kwargs.get("mm_encoder_outputs") is None:  # a capture made now belongs to this call
            self.vision.clear()
        return self._on_prefill(kwargs, self._options)

    def _on_prefill(self, kwargs: dict, options: CallOptions):
        ad, plan = self.adapter, self.plan
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise UnsupportedInputError(
                "vtprune needs input_ids to locate the image tokens (inputs_embeds alone cannot be pruned)"
            )
        cache = hf.get_cache(kwargs)
        if hf.is_static_cache(cache):
            raise UnsupportedInputError("static (compileable) caches cannot hold per-layer pruned lengths")
        mask2d = kwargs.get("attention_mask")
        mask2d = torch.ones_like(input_ids) if mask2d is None else mask2d.long()
        is_img = is_visual(input_ids, ad) & mask2d.bool()
        if self.stages:
            ad.check_inputs(input_ids, kwargs)
        positions = ad.original_positions(input_ids, mask2d, kwargs) if bool(is_img.any()) else None

        images, n_visual, rows_of = find_images(
            input_ids=input_ids,
            mask2d=mask2d,
            is_img=is_img,
            positions=positions,
            kwargs={**options.layout_kwargs, **kwargs},
            adapter=ad,
            method=self.method,
            budget=self.budget,
            n_stages=len(self.stages),
        )
        self.last = None
        if not any(img.counts and min(img.counts) < img.n for img in images):  # nothing to prune: stock forward
            self.last = passthrough_record(n_visual, images, mask2d, self.recorder)
            return None
        if kwargs.get("labels") is not None and plan.stage_at_layer:
            raise UnsupportedInputError("labels cannot be combined with in-LLM pruning (the output rows change)")
        if plan.stage_at_layer:
            guards.refuse_right_padding(mask2d)

        suffix_rows = []
        if plan.text_wanted or plan.needs_suffix_rows:
            suffix_rows = self.question.read(
                input_ids=input_ids, mask2d=mask2d, images=images, generation_start=options.generation_start
            )
        fw = ForwardState(
            prefill=True,
            images=images,
            groups=[first_group(mask2d=mask2d, positions=positions, images=images, rows_of=rows_of)],
            cache=cache,
            n_visual=n_visual,
            suffix_rows=suffix_rows,
            generation_start=options.generation_start,
        )
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(ad.text_config, "use_cache", True)
        if use_cache and cache is None:  # create it here so that decode steps can be recognised
            fw.cache = hf.new_dynamic_cache(ad.text_config)
            hf.set_cache(kwargs, fw.cache)

        if plan.before_llm:
            prune_before_llm(fw, kwargs, adapter=ad, plan=plan, selector=self.selector, vision=self.vision)
        kwargs["attention_mask"] = fw.groups[0].mask2d
        kwargs["position_ids"] = fw.groups[0].positions
        self._forward = fw
        return (), kwargs

    def _after_model_call(self, module, args, output):
        fw = self._forward
        if fw is not None and fw.prefill:
            self.last = pruned_record(fw, self.recorder)
            cache = hf.output_cache(output)
            cache = fw.cache if cache is None else cache
            if cache is not None:  # keep the prefill's groups for the decode steps on this cache
                fw.prefill = False
                fw.captured.clear()
                self._decode[cache] = fw
        self._forward = None

    # --- decoder-layer hooks ---------------------------------------------------------------------
    def _on_layer(self, idx: int, layer: nn.Module, args, kwargs):
        fw = self._forward
        if fw is None:
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hidden = self.in_llm.on_layer(fw, idx, layer, hidden, kwargs)
        return (hidden,) + tuple(args[1:]), kwargs

    def _on_injection_call(self, module, args, kwargs):
        """Pre-hook of the adapter's `injection_module` at a pruned prefill: take the per-row features the model
        would add after its `injection_layers` out of the stock loop (`_on_injection_layer` re-adds them)."""
        fw = self._forward
        if fw is None or not fw.prefill:
            return None
        fw.injection = self.adapter.take_injections(kwargs)
        return args, kwargs

    def _on_injection_layer(self, idx: int, layer: nn.Module, args, output):
        fw = self._forward
        if fw is None or not fw.prefill or fw.injection is None:
            return None
        return inject(fw, idx=idx, output=output, adapter=self.adapter)

    def _on_layer_output(self, idx: int, layer: nn.Module, args, output):
        fw = self._forward
        if fw is None:
            return None
        return repair(fw, idx=idx, output=output, method=self.method)


def _refuse_input_transform(model: nn.Module, adapter: ModelAdapter, method: PruningMethod) -> None:
    if adapter.dynamic_resolution and getattr(method, "resizes_images", False):
        raise UnsupportedInputError(
            f"{method.name!r} on {type(model).__name__} is an input transform: resize the images before the "
            "processor with vtprune.methods.downsample.downsample_image(image, ratio=ρ or factor=D) and run "
            "the model unpatched (a forward hook cannot resize an image the processor already cut into patches)"
        )


def _describe_model(method: PruningMethod, model: nn.Module, adapter: ModelAdapter, budget: Budget) -> None:
    """Tell the method what the model offers: signals, name, signature, and the budget for its visual-token count
    where that count is fixed."""
    method.available_signals = sig.LLM_SIGNALS | sig.TEXT_SIGNALS | adapter.vision_signal_names
    method.model_name = str(getattr(model, "name_or_path", "") or "") or None
    method.model_signature = {
        "model_class": type(model).__name__,
        "hidden_size": int(adapter.text_config.hidden_size),
        "num_layers": int(adapter.num_layers),
    }
    n = adapter.nominal_visual_tokens()
    method.budget_request = BudgetRequest(budget.tokens_for(n), n, budget.mode) if n else None


def _check_nominal_budget(adapter: ModelAdapter, method: PruningMethod, budget: Budget, stages: tuple) -> None:
    """Fail at apply time when the budget is infeasible for the model's fixed token count."""
    n = adapter.nominal_visual_tokens()
    if n and stages:
        k = budget.tokens_for(n)
        if k < n:
            method.schedule(n, k, budget.mode, adapter.num_layers)
