"""A method defined outside the package (vision stage, [CLS] signal) works with no engine change;
beam search and ratio budgets run through the same plumbing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from oracles import generate_logits, masked_reference_logits

import vtprune
from vtprune.methods import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, register, stable_topk


@dataclass
class ClsTopConfig(MethodConfig):
    pass


@register
class ClsTop(PruningMethod):
    """Test method: keep the tokens with the highest CLIP [CLS] attention (a VisionZip-dominant-like rule)."""

    name = "test_cls_top"
    config_class = ClsTopConfig

    def stages(self):
        return (Stage("vision"),)

    def signals(self, stage_index):
        return frozenset({"cls_attention", "vision_keys"})

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        assert image.signals["vision_keys"].shape == (image.n, 32)
        return KeepPlan(stable_topk(image.signals["cls_attention"], k))


def _eager_cls(model, pixels):
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            out = model.model.vision_tower(pixels, output_attentions=True)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    return out.attentions[-2][:, :, 0, 1:].mean(1)


def test_registered_vision_method_selects_by_cls_attention(models, batches):
    model, inputs = models["sdpa"], batches[2]
    assert "test_cls_top" in vtprune.methods()
    cls = _eager_cls(model, inputs["pixel_values"])
    with vtprune.pruned(model, "test_cls_top", 48):
        tokens, logits = generate_logits(model, inputs, 3)  # capture happens inside generate's encoding
        rec = vtprune.last_run(model)
        with torch.no_grad():
            fwd = model(**inputs).logits[:, -1]  # capture happens inside the engine's own encoding
        assert all(torch.equal(a.events[0].keep_idx, b.events[0].keep_idx)
                   for a, b in zip(rec.samples, vtprune.last_run(model).samples, strict=True))
    for b, sample in enumerate(rec.samples):
        assert set(sample.events[0].keep_idx.tolist()) == set(cls[b].topk(48).indices.tolist())
    ref = masked_reference_logits(model, inputs, rec, tokens[:, :-1])
    prompt = inputs["input_ids"].shape[1]
    assert (logits - ref[:, prompt - 1 :]).abs().max() <= 1e-4
    assert (fwd - ref[:, prompt - 1]).abs().max() <= 1e-4


def test_beam_search_runs_and_bypass_equals_stock(models, batches):
    model, inputs = models["sdpa"], batches[2]
    kw = dict(max_new_tokens=3, num_beams=2, do_sample=False, suppress_tokens=[250])
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        with vtprune.pruned(model, "fastv", 576):
            same = model.generate(**inputs, **kw)
        for method, budget in (("fastv", 200), ("random", 64)):
            with vtprune.pruned(model, method, budget):
                out = model.generate(**inputs, **kw)
            assert out.shape == ref.shape
    assert torch.equal(same, ref)


def test_ratio_budget(models, batches):
    model, inputs = models["sdpa"], batches[1]
    with vtprune.pruned(model, "random", 1 / 9):
        with torch.no_grad():
            model(**inputs)
        assert vtprune.last_run(model).samples[0].retained_tokens == 64  # floor(576/9 + 0.5)
