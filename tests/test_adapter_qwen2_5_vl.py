"""Qwen2.5-VL adapter: the engine oracles (O1, O2, O3, batch independence, remove, from_pretrained) on a
tiny random model with two images of different sizes, M-RoPE decode positions, §7 vision signals, bad input."""

from __future__ import annotations

import pytest
import torch
from oracles import generate_logits, masked_reference_logits
from transformers import Qwen2_5_VLForConditionalGeneration

import vtprune
from vtprune.errors import UnsupportedInputError
from vtprune.methods.pool import pool_grid, pooled_shape
from vtprune.testing import QWEN_VIDEO_TOKEN_ID, qwen_inputs, tiny_qwen2_5_vl

torch.set_num_threads(1)

PROMPTS = [([1, 5, 6], [7, 8, 9, 10]), ([1, 2], [17, 18, 19, 20, 21, 22, 23])]
SIZES = [(112, 168), (84, 112)]  # merged grids 4×6 = 24 and 3×4 = 12 tokens
# budgets are ratios so they apply to both images; FastV k=2 of 6 layers needs ρ >= 1/3
CASES = [
    ("random", 0.3, {}),
    ("random", 0.5, {"layer": 2}),
    ("pool", 0.3, {}),
    ("fastv", 0.6, {}),
    ("fastv", 0.3, {"budget_mode": "retained", "criterion": "mean_received"}),
    ("fastv", 0.7, {"k": 3, "positions": "reindex"}),
    ("random", 0.3, {"positions": "reindex"}),
    ("pool", 0.3, {"positions": "reindex"}),
]
STEPS = 3


@pytest.fixture(scope="module")
def qmodels():
    return {attn: tiny_qwen2_5_vl(attn=attn, layers=6) for attn in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def qbatches(qmodels):
    m = qmodels["sdpa"]
    return {1: qwen_inputs(m, PROMPTS[:1], SIZES[:1], seed=1), 2: qwen_inputs(m, PROMPTS, SIZES, seed=2)}


def _apply(model, method, budget, options):
    options = dict(options)
    kw = {k: options.pop(k) for k in ("budget_mode", "positions") if k in options}
    return vtprune.apply(model, method, budget, **kw, **options)


def _alone(inputs, b):
    pad = int((inputs["attention_mask"][b] == 0).sum())
    grid = inputs["image_grid_thw"]
    patches = grid.prod(-1).tolist()
    start = sum(patches[:b])
    return {
        "input_ids": inputs["input_ids"][b : b + 1, pad:],
        "attention_mask": inputs["attention_mask"][b : b + 1, pad:],
        "mm_token_type_ids": inputs["mm_token_type_ids"][b : b + 1, pad:],
        "pixel_values": inputs["pixel_values"][start : start + patches[b]],
        "image_grid_thw": grid[b : b + 1],
    }


def _pool_replacements(model, inputs, record):
    feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    out = {}
    for b, sample in enumerate(record.samples):
        rows = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        _, h, w = (int(v) // 2 if i else int(v) for i, v in enumerate(inputs["image_grid_thw"][b]))
        hp, wp = pooled_shape(h, w, len(sample.events[0].keep_idx))
        pooled, reps = pool_grid(feats[b], h, w, hp, wp)
        assert torch.equal(reps, sample.events[0].keep_idx)
        for f, r in zip(pooled, reps, strict=True):
            out[(b, int(rows[r]))] = f
    return out


def test_placeholders_match_features(qmodels, qbatches):
    """The offline input builder emits exactly t·h·w/4 placeholders per image, as the model's features."""
    m, inputs = qmodels["sdpa"], qbatches[2]
    feats = m.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    for b, f in enumerate(feats):
        assert int((inputs["input_ids"][b] == m.config.image_token_id).sum()) == f.shape[0]
        assert int(inputs["mm_token_type_ids"][b].sum()) == f.shape[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("bsz", [1, 2])
@pytest.mark.parametrize("method,budget,options", CASES)
def test_pruned_equals_masking_reference_and_cached_decode(qmodels, qbatches, attn, bsz, method, budget, options):
    """O2 + O3 with 3-D M-RoPE ids (keep and reindex)."""
    model, inputs = qmodels[attn], qbatches[bsz]
    _apply(model, method, budget, options)
    try:
        tokens, logits = generate_logits(model, inputs, STEPS)
        record = vtprune.last_run(model)
        with torch.no_grad():
            prefill = model(**inputs).logits[:, -1]
    finally:
        vtprune.remove(model)
    assert record.samples[0].retained_tokens <= record.samples[0].n_visual
    replace = _pool_replacements(model, inputs, record) if method == "pool" else None
    ref = masked_reference_logits(model, inputs, record, tokens[:, :-1], replace, options.get("positions", "keep"))
    prompt = inputs["input_ids"].shape[1]
    assert (prefill - ref[:, prompt - 1]).abs().max() <= 1e-4
    assert (logits - ref[:, prompt - 1 :]).abs().max() <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,budget,options", CASES[:4] + [("none", 0.3, {})])
def test_budget_at_least_n_is_bit_identical_to_stock(qmodels, qbatches, attn, method, budget, options):
    model, inputs = qmodels[attn], qbatches[2]
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens, ref_steps = generate_logits(model, inputs, STEPS)
    options = {k: v for k, v in options.items() if k != "budget_mode"}
    _apply(model, method, 1000 if method != "none" else budget, options)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens, steps = generate_logits(model, inputs, STEPS)
        rec = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens) and torch.equal(steps, ref_steps)
    assert [s.retained_tokens for s in rec.samples] == [24, 12]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,budget,options", CASES)
def test_batch_of_two_equals_each_alone(qmodels, qbatches, attn, method, budget, options):
    model, inputs = qmodels[attn], qbatches[2]
    _apply(model, method, budget, options)
    try:
        tokens, logits = generate_logits(model, inputs, STEPS)
        kept = [s.events[-1].keep_idx for s in vtprune.last_run(model).samples]
        for b in range(2):
            t1, l1 = generate_logits(model, _alone(inputs, b), STEPS)
            assert torch.equal(vtprune.last_run(model).samples[0].events[-1].keep_idx, kept[b])
            assert (l1[0] - logits[b]).abs().max() <= 1e-4
            assert torch.equal(t1[0], tokens[b])
    finally:
        vtprune.remove(model)


@pytest.mark.parametrize("method,budget,options", [CASES[0], CASES[3], CASES[5]])
def test_remove_restores_stock_bit_exactly(qmodels, qbatches, method, budget, options):
    model, inputs = qmodels["sdpa"], qbatches[2]
    with torch.no_grad():
        before = model(**inputs).logits
    with vtprune.pruned(model, method, budget, **options):
        with torch.no_grad():
            pruned = model(**inputs).logits
    with torch.no_grad():
        after = model(**inputs).logits
    assert pruned.shape[1] <= before.shape[1]
    assert torch.equal(before, after)
    assert not model._forward_pre_hooks and "generate" not in model.__dict__
    assert all(not layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_from_pretrained_round_trip(qmodels, qbatches, tmp_path):
    model, inputs = qmodels["sdpa"], qbatches[2]
    model.save_pretrained(tmp_path / "tiny")
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "tiny", attn_implementation="sdpa").eval()
    loaded.generation_config.eos_token_id = None
    for m in (model, loaded):
        vtprune.apply(m, "fastv", 0.6)
    try:
        t0, l0 = generate_logits(model, inputs, STEPS)
        t1, l1 = generate_logits(loaded, inputs, STEPS)
    finally:
        vtprune.remove(model)
        vtprune.remove(loaded)
    assert torch.equal(t0, t1) and torch.equal(l0, l1)


def _decode_positions(model, inputs, steps):
    """3-D ids the text model receives at each decode step -> (steps, 3, B)."""
    seen = []

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids")
        if kwargs["inputs_embeds"].shape[1] == 1:
            seen.append((pos[1:] if pos.shape[0] == 4 else pos)[:, :, 0].clone())

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generate_logits(model, inputs, steps)
    finally:
        handle.remove()
    return torch.stack(seen)


@pytest.mark.parametrize("method,budget", [("random", 0.3), ("fastv", 0.6)])
def test_decode_positions_continue_after_unpruned_prompt(qmodels, qbatches, method, budget):
    """Decode ids with pruning == max(original ids) + 1 + t == the stock model's own decode ids."""
    model, inputs = qmodels["sdpa"], qbatches[2]
    stock = _decode_positions(model, inputs, 5)  # the 4 decode steps feed generated tokens t = 0..3
    with vtprune.pruned(model, method, budget):
        pruned = _decode_positions(model, inputs, 5)
    orig, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    start = orig.amax((0, 2)) + 1  # (B,)
    expected = start[None, None, :] + torch.arange(4)[:, None, None]
    assert torch.equal(pruned, expected.expand_as(pruned))
    assert torch.equal(stock, pruned)


def test_vision_signals_follow_merger_order():
    """§7 signal: with a single full-attention ViT block the column means must not depend on the window
    permutation (window 56 px vs one window), and equal a brute-force reference in raster order."""
    m = tiny_qwen2_5_vl(layers=2, vision_depth=1)
    inputs = qwen_inputs(m, PROMPTS, SIZES, seed=3)
    ad = vtprune.models.adapter_for(m)
    got = []
    hooks = [
        mod.register_forward_pre_hook(
            lambda mod, a, k: got.append(ad.vision_signals(mod, k.get("hidden_states", a[0] if a else None), k)),
            with_kwargs=True,
        )
        for mod in ad.vision_hook_modules()
    ]
    try:
        with torch.no_grad():
            m.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            m.model.visual.window_size = 10_000  # one window per image: identity permutation
            m.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        m.model.visual.window_size = 56
        for h in hooks:
            h.remove()
    windowed, plain = [g for g in got if g is not None]
    for a, b in zip(windowed["cls_attention"], plain["cls_attention"], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(windowed["vision_keys"], plain["vision_keys"], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert [t.shape[0] for t in windowed["cls_attention"]] == [24, 12]
    assert abs(float(windowed["cls_attention"][0].sum()) * 4 - 1.0) < 1e-4  # column means of a softmax


def test_bad_inputs(qmodels, qbatches):
    model, inputs = qmodels["sdpa"], qbatches[2]
    with vtprune.pruned(model, "random", 0.3):
        bad = dict(inputs, input_ids=inputs["input_ids"].clone())
        bad["input_ids"][0, -2] = model.config.image_token_id  # an extra placeholder in the suffix
        with pytest.raises(UnsupportedInputError):
            with torch.no_grad():
                model(**bad)
        video = dict(inputs, input_ids=inputs["input_ids"].clone())
        video["input_ids"][1, -1] = QWEN_VIDEO_TOKEN_ID
        with pytest.raises(UnsupportedInputError, match="video"):
            with torch.no_grad():
                model(**video)
