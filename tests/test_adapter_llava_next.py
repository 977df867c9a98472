"""LLaVA-NeXT adapter: engine oracles on a tiny AnyRes model (56 px tiles of 4×4 tokens, two images of
different sizes), newline policy, layout, bad input."""

from __future__ import annotations

import pytest
import torch
from oracles import generate_logits, masked_reference_logits

import vtprune
from vtprune.errors import UnsupportedInputError
from vtprune.testing import llava_next_inputs, tiny_llava_next

torch.set_num_threads(1)

PROMPTS = [([1, 5, 6], [7, 8, 9, 10]), ([1, 2], [17, 18, 19, 20, 21, 22])]
SIZES = [(100, 160), (112, 60)]  # 16 base + 6×8 = 64 and 16 + 8×4 = 48 visual tokens; 6 and 8 newlines
CASES = [
    ("random", 0.3, {}),
    ("random", 0.5, {"layer": 2}),
    ("fastv", 0.6, {}),
    ("fastv", 0.3, {"budget_mode": "retained", "criterion": "mean_received"}),
    ("random", 0.3, {"positions": "reindex"}),
    ("fastv", 0.7, {"k": 3, "positions": "reindex"}),
]
STEPS = 3


@pytest.fixture(scope="module")
def nmodels():
    return {attn: tiny_llava_next(attn=attn, layers=6) for attn in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def nbatches(nmodels):
    m = nmodels["sdpa"]
    return {1: llava_next_inputs(m, PROMPTS[:1], SIZES[:1], seed=1), 2: llava_next_inputs(m, PROMPTS, SIZES, seed=2)}


def _apply(model, method, budget, options):
    options = dict(options)
    kw = {k: options.pop(k) for k in ("budget_mode", "positions") if k in options}
    return vtprune.apply(model, method, budget, **kw, **options)


def test_layout_and_candidates(nmodels, nbatches):
    """Candidates = base view + unpadded tiles (no newlines); grids/crops as spec §8; counts recorded."""
    m, inputs = nmodels["sdpa"], nbatches[2]
    ad = vtprune.models.adapter_for(m)
    assert [ad.tile_area(s) for s in SIZES] == [(6, 8), (8, 4)]
    with vtprune.pruned(m, "random", 1000):
        with torch.no_grad():
            m(**inputs)
        rec = vtprune.last_run(m)
        ad = m._vtprune.adapter  # the session's adapter holds this prefill's layouts
        assert ad.image_layout(0, 64)[0] == [(4, 4), (6, 8)]
        assert int(ad.candidate_mask(1, 56).sum()) == 48
    assert [s.n_visual for s in rec.samples] == [64, 48]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("bsz", [1, 2])
@pytest.mark.parametrize("method,budget,options", CASES)
def test_pruned_equals_masking_reference_and_cached_decode(nmodels, nbatches, attn, bsz, method, budget, options):
    model, inputs = nmodels[attn], nbatches[bsz]
    _apply(model, method, budget, options)
    try:
        tokens, logits = generate_logits(model, inputs, STEPS)
        record = vtprune.last_run(model)
        with torch.no_grad():
            out = model(**inputs).logits
    finally:
        vtprune.remove(model)
    newlines = [6, 8][:bsz]
    if method == "random" and "layer" not in options:  # pre-LLM: newlines dropped with the image
        assert out.shape[1] == max(s.n_text + s.retained_tokens for s in record.samples)
    else:  # llm:k keeps newlines as structural rows
        assert [s.n_text for s in record.samples] == [
            len(p[0]) + len(p[1]) + n for p, n in zip(PROMPTS, newlines, strict=False)
        ]
    ref = masked_reference_logits(model, inputs, record, tokens[:, :-1], None, options.get("positions", "keep"))
    prompt = inputs["input_ids"].shape[1]
    assert (out[:, -1] - ref[:, prompt - 1]).abs().max() <= 1e-4
    assert (logits - ref[:, prompt - 1 :]).abs().max() <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["random", "pool", "fastv", "none"])
def test_budget_at_least_n_is_bit_identical_to_stock(nmodels, nbatches, attn, method):
    model, inputs = nmodels[attn], nbatches[2]
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens, ref_steps = generate_logits(model, inputs, STEPS)
    with vtprune.pruned(model, method, 1000):
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens, steps = generate_logits(model, inputs, STEPS)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens) and torch.equal(steps, ref_steps)


@pytest.mark.parametrize("method,budget,options", CASES + [("pool", 0.3, {})])
def test_batch_of_two_equals_each_alone(nmodels, nbatches, method, budget, options):
    model, inputs = nmodels["sdpa"], nbatches[2]
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
                "image_sizes": inputs["image_sizes"][b : b + 1],
            }
            t1, l1 = generate_logits(model, alone, STEPS)
            assert torch.equal(vtprune.last_run(model).samples[0].events[-1].keep_idx, kept[b])
            assert (l1[0] - logits[b]).abs().max() <= 1e-4
            assert torch.equal(t1[0], tokens[b])
    finally:
        vtprune.remove(model)


def test_remove_restores_stock_bit_exactly(nmodels, nbatches):
    model, inputs = nmodels["sdpa"], nbatches[2]
    with torch.no_grad():
        before = model(**inputs).logits
    with vtprune.pruned(model, "fastv", 0.6):
        with torch.no_grad():
            model(**inputs)
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after) and not model._forward_pre_hooks


def test_bad_inputs(nmodels, nbatches):
    model, inputs = nmodels["sdpa"], nbatches[2]
    with vtprune.pruned(model, "random", 0.3):
        bad = dict(inputs, input_ids=inputs["input_ids"].clone())
        bad["input_ids"][0, -2] = model.config.image_token_id
        with pytest.raises(UnsupportedInputError):
            with torch.no_grad():
                model(**bad)
        no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
        with pytest.raises(UnsupportedInputError, match="image_sizes"):
            with torch.no_grad():
                model(**no_sizes)
