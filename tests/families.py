"""The shared oracle suite (spec README §11) for any method on the three tiny model families.

`family(name)` builds (once per test session) 6-layer fp32 tiny models of one family, sdpa and eager, and
batches of one and two prompts; `check_oracles(...)` runs on one (family, method, budget, options):

- O1 bypass: a budget >= N gives logits and generated ids bit-identical to the stock model;
- O3 cached decode: greedy `generate` with the cache == one uncached forward over prompt + generated ids
  in which the method's plans (keep lists and merged features) are replayed, so the pruned sequence and
  positions are the same (this holds for merging and text-conditioned methods alike);
- O2 / §11.4 (selection-only methods): the pruned logits == the unpruned model with removed keys masked
  (`oracles.masked_reference_logits`), prefill and cached steps;
- §11.6 batch independence: each sample alone gives the same keep lists, logits and ids as in the batch;
- §11.2 keep lists sorted and unique; `last_run` counts present.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cache

import torch
from factories import (
    GEMMA_CROPS,
    INTERNVL_TILES,
    NEXT_SIZES,
    ONEVISION_SIZES,
    PROMPTS,
    QWEN3_SIZES,
    QWEN_SIZES,
    tiny,
)
from factories import (
    grid_layout as grid_layout,  # re-exported: the method tests import it from here
)
from oracles import generate_logits, masked_reference_logits

import vtprune
from vtprune.methods import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, register, stable_topk
from vtprune.testing import (
    gemma3_inputs,
    internvl_inputs,
    llava_inputs,
    llava_next_inputs,
    llava_onevision_inputs,
    qwen_inputs,
)

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
STEPS = 3
TOL = 1e-4
BYPASS = 10**6  # a budget above every image's token count


@dataclass
class Family:
    name: str
    models: dict = field(default_factory=dict)  # attn -> model
    batches: dict = field(default_factory=dict)  # 1 | 2 -> inputs

    def alone(self, inputs: dict, b: int) -> dict:
        """Sample b of a batch as a batch of one (left padding removed)."""
        pad = int((inputs["attention_mask"][b] == 0).sum())
        out = {
            k: inputs[k][b : b + 1, pad:]
            for k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
            if k in inputs
        }
        if "image_grid_thw" in inputs:  # Qwen2.5-VL / Qwen3-VL: flattened patches per image
            grid = inputs["image_grid_thw"]
            patches = grid.prod(-1).tolist()
            start = sum(patches[:b])
            out["pixel_values"] = inputs["pixel_values"][start : start + patches[b]]
            out["image_grid_thw"] = grid[b : b + 1]
        elif self.name == "internvl":  # a sample's tiles from its placeholder count
            cfg = self.models["sdpa"].config
            counts = ((inputs["input_ids"] == cfg.image_token_id).sum(1) // int(cfg.image_seq_length)).tolist()
            start = sum(counts[:b])
            out["pixel_values"] = inputs["pixel_values"][start : start + counts[b]]
        elif "token_type_ids" in inputs:  # Gemma 3: a sample's images / crops from its soft-token count
            soft = (inputs["token_type_ids"] == 1).sum(1)
            per_image = int(soft.sum()) // inputs["pixel_values"].shape[0]
            counts = (soft // per_image).tolist()
            start = sum(counts[:b])
            out["pixel_values"] = inputs["pixel_values"][start : start + counts[b]]
        else:
            out["pixel_values"] = inputs["pixel_values"][b : b + 1]
            if "image_sizes" in inputs:
                out["image_sizes"] = inputs["image_sizes"][b : b + 1]
            if "batch_num_images" in inputs:  # LLaVA-OneVision: one image per sample here
                out["batch_num_images"] = inputs["batch_num_images"][b : b + 1]
        return out


#: family -> (model options, inputs of a batch of one, inputs of the batch of two)
_SETUPS = {
    "llava": ({}, lambda m: llava_inputs(m, PROMPTS[:1], seed=1), lambda m: llava_inputs(m, PROMPTS, seed=2)),
    "llava_next": (
        {},
        lambda m: llava_next_inputs(m, PROMPTS[:1], NEXT_SIZES[:1], seed=1),
        lambda m: llava_next_inputs(m, PROMPTS, NEXT_SIZES, seed=2),
    ),
    "qwen2_5_vl": (
        {},
        lambda m: qwen_inputs(m, PROMPTS[:1], QWEN_SIZES[:1], seed=1),
        lambda m: qwen_inputs(m, PROMPTS, QWEN_SIZES, seed=2),
    ),
    # not in FAMILIES: tests/test_adapter_<family>.py run their oracle suites
    "qwen3_vl": (
        {},
        lambda m: qwen_inputs(m, PROMPTS[:1], QWEN3_SIZES[:1], seed=1),
        lambda m: qwen_inputs(m, PROMPTS, QWEN3_SIZES, seed=2),
    ),
    "llava_onevision": (
        {},
        lambda m: llava_onevision_inputs(m, PROMPTS[:1], ONEVISION_SIZES[:1], seed=1),
        lambda m: llava_onevision_inputs(m, PROMPTS, ONEVISION_SIZES, seed=2),
    ),
    "gemma3": (
        {"sliding_window": 80},
        lambda m: gemma3_inputs(m, PROMPTS[:1], GEMMA_CROPS[:1], seed=1),
        lambda m: gemma3_inputs(m, PROMPTS, GEMMA_CROPS, seed=2),
    ),
    "internvl": (
        {},
        lambda m: internvl_inputs(m, PROMPTS[:1], INTERNVL_TILES[:1], seed=1),
        lambda m: internvl_inputs(m, PROMPTS, INTERNVL_TILES, seed=2),
    ),
}


@cache
def family(name: str) -> Family:
    """The family's shared 6-layer fp32 models (sdpa and eager, `factories.tiny`) and its batches of one and two
    prompts (`factories.PROMPTS` and the family's image sizes), built once per test session."""
    if name not in _SETUPS:
        raise ValueError(f"unknown family {name!r}; one of {FAMILIES}, qwen3_vl, llava_onevision, gemma3, internvl")
    options, one, two = _SETUPS[name]
    fam = Family(name)
    fam.models = {a: tiny(name, attn=a, layers=6, **options) for a in ("sdpa", "eager")}
    m = fam.models["sdpa"]
    fam.batches = {1: one(m), 2: two(m)}
    return fam


def apply(model, method, budget, options: dict | None = None, **extra):
    """`vtprune.apply` with engine options (budget_mode, positions, tokenizer) taken out of `options`."""
    options = dict(options or {})
    kw = {k: options.pop(k) for k in ("budget_mode", "positions", "tokenizer") if k in options}
    return vtprune.apply(model, method, budget, **kw, **options, **extra)


class _Plans(list):
    """Recorded (stage, plan) pairs; `.memos`: a shallow copy of the image's memo after each select."""

    memos: list


@contextmanager
def recorded_plans(model):
    """Record every `KeepPlan` the attached method returns (whole plans, cloned), in call order: yields the list."""
    method = vtprune.session_of(model).method
    stock = method.select
    plans = _Plans()
    plans.memos = []

    def record(stage, image, k):
        plan = stock(stage, image, k)
        plans.append((stage, _clone_plan(plan)))
        plans.memos.append(dict(image.memo))
        return plan

    method.select = record
    try:
        yield plans
    finally:
        del method.select


@contextmanager
def replayed_plans(model, plans: list):
    """Make the attached method return `plans` again, in the same order (and check the stages match)."""
    method = vtprune.session_of(model).method
    queue = list(plans)
    memos = list(getattr(plans, "memos", [None] * len(plans)))

    def replay(stage, image, k):
        want_stage, plan = queue.pop(0)
        memo = memos.pop(0)
        assert stage == want_stage and len(plan.keep_idx) <= image.n
        if memo is not None:  # the method's per-image state too (e.g. RCP's repair context)
            image.memo.update(memo)
        return _clone_plan(plan)

    method.select = replay
    try:
        yield
        assert not queue, f"{len(queue)} recorded plans were not replayed"
    finally:
        del method.select


def _clone_plan(plan):
    """A KeepPlan with every tensor field cloned (inserted tokens and order included)."""
    tensors = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    return dataclasses.replace(plan, **{k: v.clone() for k, v in tensors.items() if torch.is_tensor(v)})


def _extend(inputs: dict, tokens: torch.Tensor) -> dict:
    """inputs with generated ids appended to every (B, L) text tensor."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], tokens], 1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1)
    for name in ("mm_token_type_ids", "token_type_ids"):  # Qwen / Gemma 3: generated tokens are text (0)
        if name in inputs:
            out[name] = torch.cat([inputs[name], torch.zeros_like(tokens)], 1)
    return out


def _input_rows(logits: torch.Tensor, seq_index: torch.Tensor | None, rows) -> torch.Tensor:
    """Logits (B, L', V) of a pruned forward at the given *input* rows (via `RunRecord.sequence_index`)."""
    rows = torch.tensor(list(rows))
    if seq_index is None:
        return logits[:, rows]
    where = (seq_index[:, None, :] == rows[None, :, None]).float().argmax(-1)  # (B, len(rows))
    return logits.gather(1, where[..., None].expand(-1, -1, logits.shape[-1]))


def check_oracles(
    name: str,
    method,
    budget,
    options: dict | None = None,
    *,
    selection_only: bool,
    attn: str = "sdpa",
    bypass: bool = True,
    alone: bool = True,
    steps: int = STEPS,
):
    """Run the shared oracles; returns the `RunRecord` of the pruned batch-of-two prefill.

    bypass / alone: run O1 / batch independence (eager CLIP attention gives batch-size-dependent rounding
    that can flip near-tied [CLS] rankings of a random tiny model, so eager runs may skip `alone`)."""
    fam = family(name)
    model, inputs = fam.models[attn], fam.batches[2]
    positions = (options or {}).get("positions", "keep")

    if bypass:  # O1
        with torch.no_grad():
            ref_logits = model(**inputs).logits
        ref_tokens, ref_steps = generate_logits(model, inputs, steps)
        bypass_options = {k: v for k, v in (options or {}).items() if k != "budget_mode"}
        apply(model, method, BYPASS, bypass_options)
        try:
            with torch.no_grad():
                logits = model(**inputs).logits
            tokens, step_logits = generate_logits(model, inputs, steps)
        finally:
            vtprune.remove(model)
        assert torch.equal(logits, ref_logits), "bypass (budget >= N) changed the prefill logits"
        assert torch.equal(tokens, ref_tokens) and torch.equal(step_logits, ref_steps), "bypass changed generation"

    apply(model, method, budget, options)
    try:
        with recorded_plans(model) as plans:
            tokens, step_logits = generate_logits(model, inputs, steps)
        record = vtprune.last_run(model)
        if vtprune.session_of(model).stages:
            assert plans, "the method was never asked to select (budget too large for the test model?)"
        # O3: uncached forward over prompt + generated ids with the same plans replayed
        prompt = inputs["input_ids"].shape[1]
        session = vtprune.session_of(model)
        # a repairing method (RCP): every row from the last prompt row on is generation
        replay = session.generated_rows_from(prompt - 1) if session.plan.repair_layers else nullcontext()
        with replay, replayed_plans(model, plans), torch.no_grad():
            full = model(**_extend(inputs, tokens[:, :-1]), use_cache=False).logits
        full = _input_rows(full, vtprune.last_run(model).sequence_index, range(prompt - 1, prompt - 1 + steps))
        assert (full - step_logits).abs().max() <= TOL, "cached decode != uncached replay"
        # §11.6: each sample alone
        for b in range(2 if alone else 0):
            t1, l1 = generate_logits(model, fam.alone(inputs, b), steps)
            rec1 = vtprune.last_run(model)
            for ev_b, ev_1 in zip(record.samples[b].events, rec1.samples[0].events, strict=True):
                assert torch.equal(ev_b.keep_idx, ev_1.keep_idx), f"sample {b}: keep list depends on the batch"
            assert (l1[0] - step_logits[b]).abs().max() <= TOL, f"sample {b}: logits depend on the batch"
            assert torch.equal(t1[0], tokens[b])
    finally:
        vtprune.remove(model)

    for sample in record.samples:  # §11.2
        assert sample.retained_tokens <= sample.n_visual and sample.layer_avg_tokens <= sample.n_visual
        for ev in sample.events:
            assert torch.equal(ev.keep_idx, ev.keep_idx.unique()), "keep list not sorted/unique"

    if selection_only:  # O2 / §11.4
        ref = masked_reference_logits(model, inputs, record, tokens[:, :-1], None, positions)
        assert (step_logits - ref[:, prompt - 1 :]).abs().max() <= TOL, "pruned != masking reference"
    return record


# --- a probe method for the engine's vision-stage hand-over -------------------------------------------------
@dataclass
class _SignalProbeConfig(MethodConfig):
    pass


@register
class SignalProbe(PruningMethod):
    """Test method: records each `ImageTokens` the engine hands its `vision` stage (`SignalProbe.seen`, cleared
    by the caller) and keeps the top [CLS]-attention tokens."""

    name = "test_signal_probe"
    config_class = _SignalProbeConfig
    seen: list = []

    def stages(self):
        return (Stage("vision"),)

    def signals(self, stage_index):
        return frozenset({"cls_attention", "vision_keys"})

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        type(self).seen.append(image)
        return KeepPlan(stable_topk(image.signals["cls_attention"], k))
