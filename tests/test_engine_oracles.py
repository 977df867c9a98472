"""The engine's correctness oracles on LLaVA-1.5 (O1, O2, O3, batch independence) for the seed methods, sdpa and
eager, batch 1 and 2; remove() and from_pretrained for every family are in test_method_oracles.py."""

from __future__ import annotations

import pytest
import torch
from oracles import generate_logits, masked_reference_logits

import vtprune
from vtprune import hf_compat as hf
from vtprune.methods import KeepPlan, PruningMethod, Stage
from vtprune.methods.pool import pool_grid, pooled_shape

# (method, budget, options): budgets feasible on the 6-layer test model (FastV k=2 needs n̄ >= 192).
CASES = [
    ("random", 64, {}),
    ("random", 300, {"layer": 2}),
    ("pool", 64, {}),
    ("fastv", 200, {}),
    ("fastv", 64, {"budget_mode": "retained", "criterion": "mean_received"}),
    ("fastv", 320, {"k": 3, "positions": "reindex"}),
    ("random", 64, {"positions": "reindex"}),
    ("pool", 64, {"positions": "reindex"}),
]
STEPS = 3


def _apply(model, method, budget, options):
    options = dict(options)
    kw = {k: options.pop(k) for k in ("budget_mode", "positions") if k in options}
    return vtprune.apply(model, method, budget, **kw, **options)


def _pool_replacements(model, inputs, record):
    """Pooled features at representative rows, recomputed from stock features (merging reference)."""
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    out = {}
    for b, sample in enumerate(record.samples):
        rows = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        hp, wp = pooled_shape(24, 24, len(sample.events[0].keep_idx))
        pooled, reps = pool_grid(feats[b], 24, 24, hp, wp)
        assert torch.equal(reps, sample.events[0].keep_idx)
        for f, r in zip(pooled, reps, strict=True):
            out[(b, int(rows[r]))] = f
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("bsz", [1, 2])
@pytest.mark.parametrize("method,budget,options", CASES)
def test_pruned_equals_masking_reference_and_cached_decode(models, batches, attn, bsz, method, budget, options):
    """O2 + O3: pruned prefill and cached generate == no-cache masking reference with the same kept sets."""
    model, inputs = models[attn], batches[bsz]
    _apply(model, method, budget, options)
    try:
        tokens, logits = generate_logits(model, inputs, STEPS)
        record = vtprune.last_run(model)
        with torch.no_grad():
            prefill = model(**inputs).logits[:, -1]
        assert (
            vtprune.last_run(model).samples[0].events[0].keep_idx.tolist()
            == record.samples[0].events[0].keep_idx.tolist()
        )
    finally:
        vtprune.remove(model)
    replace = _pool_replacements(model, inputs, record) if method == "pool" else None
    ref = masked_reference_logits(model, inputs, record, tokens[:, :-1], replace, options.get("positions", "keep"))
    prompt = inputs["input_ids"].shape[1]
    assert (prefill - ref[:, prompt - 1]).abs().max() <= 1e-4
    assert (logits - ref[:, prompt - 1 :]).abs().max() <= 1e-4
    for sample in record.samples:
        for ev in sample.events:
            assert ev.keep_idx.dtype == torch.long
            assert torch.equal(ev.keep_idx, ev.keep_idx.unique())  # sorted, unique


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,budget,options", CASES + [("none", 64, {})])
def test_budget_at_least_n_is_bit_identical_to_stock(models, batches, attn, method, budget, options):
    """O1: budget >= N bypasses the method: logits and generated ids identical to the stock model."""
    model, inputs = models[attn], batches[2]
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens, ref_steps = generate_logits(model, inputs, STEPS)
    options = {k: v for k, v in options.items() if k != "budget_mode"}
    _apply(model, method, 576 if method != "none" else budget, options)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens, steps = generate_logits(model, inputs, STEPS)
        rec = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens) and torch.equal(steps, ref_steps)
    assert rec.samples[0].layer_avg_tokens == 576 and rec.samples[0].retained_tokens == 576


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,budget,options", CASES)
def test_batch_of_two_equals_each_alone(models, batches, attn, method, budget, options):
    model, inputs = models[attn], batches[2]
    _apply(model, method, budget, options)
    try:
        tokens, logits = generate_logits(model, inputs, STEPS)
        kept = [s.events[-1].keep_idx for s in vtprune.last_run(model).samples]
        for b in range(2):
            pad = int((inputs["attention_mask"][b] == 0).sum())
            alone = {
                "input_ids": inputs["input_ids"][b : b + 1, pad:],
                "attention_mask": inputs["attention_mask"][b : b + 1, pad:],
                "pixel_values": inputs["pixel_values"][b : b + 1],
            }
            t1, l1 = generate_logits(model, alone, STEPS)
            assert torch.equal(vtprune.last_run(model).samples[0].events[-1].keep_idx, kept[b])
            assert (l1[0] - logits[b]).abs().max() <= 1e-4
            assert torch.equal(t1[0], tokens[b])
    finally:
        vtprune.remove(model)


def test_kv_cache_holds_only_kept_rows(models, batches):
    model, inputs = models["sdpa"], batches[2]
    with vtprune.pruned(model, "fastv", 200):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        rec = vtprune.last_run(model)
    lengths = [layer.keys.shape[2] for layer in hf.output_cache(out).layers]
    prompt = inputs["input_ids"].shape[1]
    kept = max(s.n_text + s.visual_per_layer[-1] for s in rec.samples)
    assert lengths[:2] == [prompt + 1] * 2
    assert lengths[2:] == [kept + 1] * 4
    assert rec.samples[0].visual_per_layer == [576, 576] + [12] * 4  # R = round((6·200 − 2·576)/4) = 12


class _TwoCuts(PruningMethod):
    """Two in-LLM cuts keeping every other token (engine regression: the second cut must gather the first
    group's (cos, sin), not the model's full-length ones)."""

    name = "two_cuts"

    def stages(self):
        return (Stage("llm", 2), Stage("llm", 4))

    def schedule(self, n, budget, mode, num_layers):
        return [n // 2, n // 4]

    def select(self, stage_index, image, k):
        return KeepPlan(torch.arange(k) * 2)


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_two_in_llm_cuts_equal_masking_reference(models, batches, positions):
    model, inputs = models["sdpa"], batches[2]
    vtprune.apply(model, _TwoCuts(), 100, positions=positions)
    try:
        tokens, logits = generate_logits(model, inputs, STEPS)
        record = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    assert record.samples[0].visual_per_layer == [576, 576, 288, 288, 144, 144]
    ref = masked_reference_logits(model, inputs, record, tokens[:, :-1], None, positions)
    assert (logits - ref[:, inputs["input_ids"].shape[1] - 1 :]).abs().max() <= 1e-4
