"""Qwen2.5-VL adapter on a tiny random model with two images of different sizes:
M-RoPE decode positions, §7 vision signals, bad input; video (each temporal group an image, spec §7) and
mixed image/video batches through the oracles. The image oracles (O1-O3, batch independence), remove() and
from_pretrained of every method run in test_method_oracles.py."""

from __future__ import annotations

import pytest
import torch
from factories import PROMPTS
from factories import QWEN_SIZES as SIZES  # merged grids 4×6 = 24 and 3×4 = 12 tokens
from families import SignalProbe, family
from oracles import generate_logits

import vtprune
from vtprune import hf_compat as hf
from vtprune.errors import UnsupportedInputError
from vtprune.testing import QWEN_VIDEO_TOKEN_ID, qwen_inputs, qwen_video_inputs, tiny_qwen2_5_vl

torch.set_num_threads(1)

STEPS = 3


@pytest.fixture(scope="module")
def qmodels():
    """The session's shared 6-layer Qwen2.5-VL models (sdpa, eager): `families.family`."""
    return family("qwen2_5_vl").models


@pytest.fixture(scope="module")
def qbatches():
    """Batches of one and two prompts (`factories.PROMPTS`) with images of `SIZES`."""
    return family("qwen2_5_vl").batches


def _apply(model, method, budget, options):
    options = dict(options)
    kw = {k: options.pop(k) for k in ("budget_mode", "positions") if k in options}
    return vtprune.apply(model, method, budget, **kw, **options)


def test_placeholders_match_features(qmodels, qbatches):
    """The offline input builder emits exactly t·h·w/4 placeholders per image, as the model's features."""
    m, inputs = qmodels["sdpa"], qbatches[2]
    feats = m.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    for b, f in enumerate(feats):
        assert int((inputs["input_ids"][b] == m.config.image_token_id).sum()) == f.shape[0]
        assert int(inputs["mm_token_type_ids"][b].sum()) == f.shape[0]


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
        video["input_ids"][1, -1] = QWEN_VIDEO_TOKEN_ID  # a video placeholder but no video given
        with pytest.raises(UnsupportedInputError, match="video"):
            with torch.no_grad():
                model(**video)


# ------------------------------------------------------------------------------------- video (spec §7)
# Sample 0: one video of 4 frames at 112×112 px (2 temporal groups of 4×4 = 32 tokens, temporal id step
# 3.0 s · 4 tokens/s = 12, so its largest id is a video id); sample 1: an image (3×4 = 12 tokens), then a
# video of 6 frames at 84×112 (3 groups of 3×4 = 36 tokens, step 0.5 · 4 = 2): a mixed image/video batch.
VIDEO_MEDIA = [[(4, 112, 112)], [(84, 112), (6, 84, 112)]]
VIDEO_SECONDS = [3.0, 0.5]
VIDEO_GROUPS = [[16, 16], [12, 12, 12, 12]]  # engine "images" per sample: video groups / image + groups
SELECTION_CASES = [
    ("random", 0.3, {}),
    ("divprune", 0.3, {}),
    ("random", 0.5, {"layer": 2}),
    ("fastv", 0.6, {}),
    ("random", 0.3, {"positions": "reindex"}),
    ("fastv", 0.7, {"k": 3, "positions": "reindex"}),
]
ALL_VIDEO_CASES = SELECTION_CASES[:4] + [("pool", 0.3, {}), ("visionzip", 0.3, {})]


@pytest.fixture(scope="module")
def vbatch(qmodels):
    return qwen_video_inputs(qmodels["sdpa"], PROMPTS, VIDEO_MEDIA, seed=4, second_per_grid_ts=VIDEO_SECONDS)


def _video_alone(model, inputs, b):
    """Sample b of a video/image batch as a batch of one (left padding removed; its own grids and pixels)."""
    cfg = model.config
    pad = int((inputs["attention_mask"][b] == 0).sum())
    out = {k: inputs[k][b : b + 1, pad:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    ids = inputs["input_ids"]
    starts = (ids == cfg.vision_start_token_id).roll(1, 1)  # the placeholder right after each start token
    for token, pix, grid in (
        (cfg.image_token_id, "pixel_values", "image_grid_thw"),
        (cfg.video_token_id, "pixel_values_videos", "video_grid_thw"),
    ):
        per_sample = ((ids == token) & starts).sum(1).tolist()
        first, mine = sum(per_sample[:b]), per_sample[b]
        if not mine:
            continue
        patches = inputs[grid].prod(-1).tolist()
        lo = sum(patches[:first])
        out[pix] = inputs[pix][lo : lo + sum(patches[first : first + mine])]
        out[grid] = inputs[grid][first : first + mine]
        if grid == "video_grid_thw" and "second_per_grid_ts" in inputs:
            out["second_per_grid_ts"] = inputs["second_per_grid_ts"][first : first + mine]
    return out


def _prompt_then_decode_positions(model, inputs, steps):
    """(3, B, L + steps): the prompt's stock M-RoPE ids, then generated tokens at max(prompt ids) + 1 + t,
    as stock `generate` numbers them (rope_deltas)."""
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        attention_mask=inputs["attention_mask"],
    )
    new = pos.amax((0, 2))[:, None] + 1 + torch.arange(steps)[None]
    return torch.cat([pos, new[None].expand(3, -1, -1)], 2)


def _video_masked_reference(model, inputs, record, new_tokens, positions="keep"):
    """(B, T, V) logits of the unpruned image+video sequence (+ new tokens) with removed visual rows masked
    as keys from their stage's layer on (same construction as `oracles.masked_reference_logits`)."""
    from oracles import stage_layer

    cfg = model.config
    ids = torch.cat([inputs["input_ids"], new_tokens], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], 1)
    lm = model.model.language_model
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        if "pixel_values" in inputs:
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            emb[ids == cfg.image_token_id] = torch.cat(list(feats))
        feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        emb[ids == cfg.video_token_id] = torch.cat(list(feats))
        pos = _prompt_then_decode_positions(model, inputs, new_tokens.shape[1])
        visual = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
        n_layers, (bsz, length) = len(lm.layers), ids.shape
        key_ok = mask.bool()[None].repeat(n_layers, 1, 1)
        for b, sample in enumerate(record.samples):
            rows = visual[b].nonzero().flatten()
            for ev in sample.events:
                gone = torch.ones(len(rows), dtype=torch.bool)
                gone[ev.keep_idx] = False
                key_ok[stage_layer(ev.stage) :, b, rows[gone]] = False
        allowed_causal = torch.ones(length, length, dtype=torch.bool).tril()
        eye = torch.eye(length, dtype=torch.bool)
        h = emb
        cos_sin = lm.rotary_emb(h, position_ids=pos)
        prompt = inputs["input_ids"].shape[1]
        for layer_idx, layer in enumerate(lm.layers):
            if positions == "reindex":
                cos_sin = lm.rotary_emb(h, position_ids=_reindex_walk(pos, key_ok[layer_idx], visual, prompt))
            allowed = (allowed_causal[None] & key_ok[layer_idx][:, None, :]) | eye[None]
            add = torch.zeros(bsz, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(h.dtype).min)
            h = layer(h, attention_mask=add, position_embeddings=cos_sin, position_ids=None)
        return model.lm_head(lm.norm(h))


def _reindex_walk(pos, present, visual, prompt):
    """Spec §6 `reindex`, row by row: visual rows keep their 3-D ids; a present prompt text row gets
    max(previous text id + 1, largest earlier visual (h, w) id + 1); generated rows (from `prompt` on)
    continue after the largest present prompt id.  pos (3, B, T) -> (3, B, T)."""
    out = pos.clone()
    for b in range(pos.shape[1]):
        nxt, top = 0, -1
        for t in range(prompt):
            if not present[b, t]:
                continue
            if visual[b, t]:
                nxt = max(nxt, int(pos[1:, b, t].max()) + 1)
            else:
                out[:, b, t] = nxt
                nxt += 1
            top = max(top, int(out[:, b, t].max()))
        out[:, b, prompt:] = top + 1 + torch.arange(pos.shape[2] - prompt)
    return out


def test_video_inputs_layout_and_budgets(qmodels, vbatch):
    """Builder counts == model features; each temporal group is one engine image (raster coords, its own
    h×w grid); the sample's budget is split over its images and groups by largest remainder."""
    model, inputs = qmodels["sdpa"], vbatch
    with torch.no_grad():
        vf = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    assert [int(f.shape[0]) for f in vf] == [32, 36]
    assert (inputs["input_ids"] == QWEN_VIDEO_TOKEN_ID).sum(1).tolist() == [32, 36]
    assert (inputs["mm_token_type_ids"] == 2).sum(1).tolist() == [32, 36]
    with vtprune.pruned(model, "random", 0.3):
        with torch.no_grad():
            model(**inputs)
        rec = vtprune.last_run(model)
        ad = model._vtprune.adapter
        layouts = [ad.image_layout(i, n) for i, n in enumerate(sum(VIDEO_GROUPS, []))]
    assert [g for g, _, _ in layouts] == [[(4, 4)]] * 2 + [[(3, 4)]] * 4
    assert torch.equal(layouts[3][1], torch.stack([torch.arange(12) // 4, torch.arange(12) % 4], 1))
    assert [s.n_visual for s in rec.samples] == [32, 48]
    assert [s.image_offsets for s in rec.samples] == [[0, 16, 32], [0, 12, 24, 36, 48]]
    kept = []
    for s in rec.samples:
        idx = s.events[0].keep_idx
        bounds = zip(s.image_offsets[:-1], s.image_offsets[1:], strict=True)
        kept.append([int(((idx >= a) & (idx < b)).sum()) for a, b in bounds])
    assert kept == [[5, 5], [4, 4, 3, 3]]  # K = 10 of 32 and 14 of 48, largest remainder, ties to the earlier


@pytest.mark.parametrize("method", ["random", "pool", "fastv", "visionzip"])
def test_video_budget_at_least_n_is_bit_identical_to_stock(qmodels, vbatch, method):
    model, inputs = qmodels["sdpa"], vbatch
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens, ref_steps = generate_logits(model, inputs, STEPS)
    with vtprune.pruned(model, method, 1000):
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens, steps = generate_logits(model, inputs, STEPS)
        rec = vtprune.last_run(model)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens) and torch.equal(steps, ref_steps)
    assert [s.retained_tokens for s in rec.samples] == [32, 48]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,budget,options", SELECTION_CASES)
def test_video_pruned_equals_masking_reference_and_cached_decode(qmodels, vbatch, attn, method, budget, options):
    """O2 + O3 on the mixed image/video batch: pre-LLM (random, divprune) and in-LLM (random layer=2,
    fastv) selections, keep and reindex positions: pruned prefill and cached steps == the masked model."""
    model, inputs = qmodels[attn], vbatch
    _apply(model, method, budget, options)
    try:
        tokens, logits = generate_logits(model, inputs, STEPS)
        record = vtprune.last_run(model)
        with torch.no_grad():
            prefill = model(**inputs).logits[:, -1]
    finally:
        vtprune.remove(model)
    assert all(s.layer_avg_tokens < s.n_visual for s in record.samples)
    ref = _video_masked_reference(model, inputs, record, tokens[:, :-1], options.get("positions", "keep"))
    prompt = inputs["input_ids"].shape[1]
    assert (prefill - ref[:, prompt - 1]).abs().max() <= 1e-4
    assert (logits - ref[:, prompt - 1 :]).abs().max() <= 1e-4


@pytest.mark.parametrize("method,budget,options", ALL_VIDEO_CASES)
def test_video_cached_decode_and_batch_independence(qmodels, vbatch, method, budget, options):
    """O3 by plan replay (merging methods too: pool, visionzip) and batch of two == each sample alone (a
    video-only prompt and an image+video prompt)."""
    from families import _extend, _input_rows, recorded_plans, replayed_plans

    model, inputs = qmodels["sdpa"], vbatch
    _apply(model, method, budget, options)
    try:
        with recorded_plans(model) as plans:
            tokens, logits = generate_logits(model, inputs, STEPS)
        record = vtprune.last_run(model)
        assert plans
        # the uncached forward gets generate's ids: a forward over prompt + generated ids would number the
        # generated rows after the last text id, while decoding continues after the largest (video t) id
        extended = _extend(inputs, tokens[:, :-1])
        extended["position_ids"] = _prompt_then_decode_positions(model, inputs, STEPS - 1)
        with replayed_plans(model, plans), torch.no_grad():
            full = model(**extended, use_cache=False).logits
        prompt = inputs["input_ids"].shape[1]
        full = _input_rows(full, vtprune.last_run(model).sequence_index, range(prompt - 1, prompt - 1 + STEPS))
        assert (full - logits).abs().max() <= 1e-4
        for b in range(2):
            t1, l1 = generate_logits(model, _video_alone(model, inputs, b), STEPS)
            for ev_b, ev_1 in zip(record.samples[b].events, vtprune.last_run(model).samples[0].events, strict=True):
                assert torch.equal(ev_b.keep_idx, ev_1.keep_idx)
            assert (l1[0] - logits[b]).abs().max() <= 1e-4
            assert torch.equal(t1[0], tokens[b])
    finally:
        vtprune.remove(model)


@pytest.mark.parametrize("method,budget", [("random", 0.3), ("fastv", 0.6)])
def _manual_decode_positions(model, inputs, steps, *, mask: bool = True):
    """3-D ids the text model gets in a manual cached decode loop without position_ids (the stock model
    then adds its `rope_deltas` = max(prompt ids) + 1 − length) -> (steps, 3, B).  mask=False: no
    attention_mask at the decode steps (stock 5.23 mis-sizes its decode ids from a 2-D mask)."""
    seen = []

    def hook(module, args, kwargs):
        if kwargs["inputs_embeds"].shape[1] == 1:
            seen.append(kwargs["position_ids"][-3:, :, 0].clone())

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            mask, cache = (inputs["attention_mask"] if mask else None), hf.output_cache(out)
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(-1)
                mask = None if mask is None else torch.cat([mask, torch.ones_like(token)], 1)
                extra = {"attention_mask": mask} if mask is not None else {}
                out = model(input_ids=token, use_cache=True, **extra, **{hf.CACHE_KWARG: cache})
    finally:
        handle.remove()
    return torch.stack(seen)


@pytest.mark.parametrize("method,budget", [("random", 0.3), ("fastv", 0.6)])
def test_video_decode_positions_continue_after_max_original_id(qmodels, vbatch, method, budget):
    """Decode ids == max(original ids) + 1 + t (spec §6; sample 0's max is a video temporal id), as the
    stock model's own cached decode (rope_deltas) numbers them.  Stock 5.23 `generate` instead appends
    last prompt id + 1 (its `position_ids[..., -1:] + 1` rule), which differs exactly in this case: the
    bypass path (stock) keeps that, pruned runs follow the spec."""
    model, inputs = qmodels["sdpa"], vbatch
    stock_generate = _decode_positions(model, inputs, 5)
    stock_manual = _manual_decode_positions(model, _video_alone(model, inputs, 0), 4, mask=False)
    with vtprune.pruned(model, method, budget):
        pruned = _decode_positions(model, inputs, 5)
        pruned_manual = _manual_decode_positions(model, inputs, 4)
    orig, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs["image_grid_thw"],
        inputs["video_grid_thw"],
        inputs["second_per_grid_ts"],
        attention_mask=inputs["attention_mask"],
    )
    video = inputs["input_ids"][0] == QWEN_VIDEO_TOKEN_ID
    assert int(orig[0, 0, video].max()) == int(orig[:, 0].max()) > int(orig[:, 0, -1].max())  # a video t id
    t = torch.arange(4)[:, None, None]
    expected = (orig.amax((0, 2)) + 1)[None, None, :] + t
    assert torch.equal(pruned, expected.expand_as(pruned))
    assert torch.equal(pruned_manual, pruned) and torch.equal(stock_manual[..., 0], pruned[..., 0])
    assert torch.equal(stock_generate, (orig[:, :, -1].amax(0) + 1)[None, None, :] + t + 0 * pruned)


def _captured_signals(model, fn):
    """Signals the adapter computes from the vision hooks during fn() -> list of per-call dicts."""
    ad = vtprune.models.adapter_for(model)
    got = []

    def hook(mod, a, k):
        got.append(ad.vision_signals(mod, k.get("hidden_states", a[0] if a else None), k))

    hooks = [mod.register_forward_pre_hook(hook, with_kwargs=True) for mod in ad.vision_hook_modules()]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return [g for g in got if g is not None]


def _group_images(inputs):
    """Each video temporal group as an image: (pixel rows of the group, grid (1, h, w)) in video order."""
    pixels, grids, start = [], [], 0
    for t, h, w in inputs["video_grid_thw"].tolist():
        for _ in range(t):
            pixels.append(inputs["pixel_values_videos"][start : start + h * w])
            grids.append([1, h, w])
            start += h * w
    return torch.cat(pixels), torch.tensor(grids)


def test_video_vision_signals_per_temporal_group_equal_image_signals(qmodels, vbatch):
    """§7 video: the signals (and features) of temporal group g == those of an image made of that group's
    patches (the ViT attends per group: same window order, rotary ids and full-attention segments), so the
    image checks (merger order, column means) carry over; lists are per group, in merger order."""
    model, inputs = qmodels["sdpa"], vbatch
    pix, grid = _group_images(inputs)
    (video,) = _captured_signals(
        model, lambda: model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    )
    (image,) = _captured_signals(model, lambda: model.model.get_image_features(pix, grid))
    assert [t.shape[0] for t in video["cls_attention"]] == [16, 16, 12, 12, 12]
    for name in ("cls_attention", "vision_keys", "vision_head_keys"):
        for a, b in zip(video[name], image[name], strict=True):
            assert (a - b).abs().max() <= 1e-5
    for a in video["cls_attention"]:
        assert abs(float(a.sum()) * 4 - 1.0) < 1e-4  # per-group column means of a softmax
    with torch.no_grad():
        vf = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
        imf = model.model.get_image_features(pix, grid).pooler_output
    assert (torch.cat(list(vf)) - torch.cat(list(imf))).abs().max() <= 1e-5


def test_video_vision_signals_do_not_depend_on_the_window_permutation():
    """With one (full-attention) ViT block, a video's per-group column means and keys must not change when
    the windows (2×2 merged tokens, per group) become one window per group: the t-major window order is
    undone correctly for several groups and videos."""
    m = tiny_qwen2_5_vl(layers=2, vision_depth=1)
    inputs = qwen_video_inputs(m, PROMPTS, [[(4, 112, 168)], [(6, 84, 112)]], seed=5)

    def run():
        return m.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])

    (windowed,) = _captured_signals(m, run)
    m.model.visual.window_size = 10_000
    try:
        (plain,) = _captured_signals(m, run)
    finally:
        m.model.visual.window_size = 56
    assert [t.shape[0] for t in windowed["cls_attention"]] == [24, 24, 12, 12, 12]
    for name, tol in (("cls_attention", 1e-6), ("vision_keys", 1e-5), ("vision_head_keys", 1e-5)):
        for a, b in zip(windowed[name], plain[name], strict=True):
            assert (a - b).abs().max() <= tol


def test_video_vision_stage_sees_per_group_signals_in_prompt_order(qmodels, vbatch):
    """Mixed batch through `generate` (its own image+video encoding) and `forward` (the engine's): each
    engine image (sample 0: groups 0, 1; sample 1: the image, groups 0..2) gets its own features, raster
    coords and signals, equal to the per-group image references."""
    model, inputs = qmodels["sdpa"], vbatch
    pix, grid = _group_images(inputs)
    (image,) = _captured_signals(
        model, lambda: model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    )
    (groups,) = _captured_signals(model, lambda: model.model.get_image_features(pix, grid))
    with torch.no_grad():
        feats = list(model.model.get_image_features(pix, grid).pooler_output)
        img_feat = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    order = [("g", 0), ("g", 1), ("i", 0), ("g", 2), ("g", 3), ("g", 4)]
    with vtprune.pruned(model, "test_signal_probe", 0.3):
        for run in ("generate", "forward"):
            SignalProbe.seen.clear()
            if run == "generate":
                generate_logits(model, inputs, 1)
            else:
                with torch.no_grad():
                    model(**inputs)
            assert [img.n for img in SignalProbe.seen] == sum(VIDEO_GROUPS, [])
            for img, (kind, j) in zip(SignalProbe.seen, order, strict=True):
                ref, feat = (groups, feats[j]) if kind == "g" else (image, img_feat)
                assert (img.features - feat).abs().max() <= 1e-5
                assert (img.signals["cls_attention"] - ref["cls_attention"][j]).abs().max() <= 1e-6
                assert (img.signals["vision_keys"] - ref["vision_keys"][j]).abs().max() <= 1e-5
                h, w = img.grids[0]
                r = torch.arange(img.n)
                assert torch.equal(img.coords.cpu(), torch.stack([r // w, r % w], 1))


def test_video_bad_inputs(qmodels, vbatch):
    model, inputs = qmodels["sdpa"], vbatch
    with vtprune.pruned(model, "random", 0.3):
        # placeholders that do not match video_grid_thw (one video token turned into text)
        short = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        row = int((inputs["input_ids"][0] == QWEN_VIDEO_TOKEN_ID).nonzero()[-1])
        short["input_ids"][0, row], short["mm_token_type_ids"][0, row] = 9, 0
        with pytest.raises(UnsupportedInputError, match="do not match"):
            with torch.no_grad():
                model(**short)
        # video features from a different clip length than the placeholders (4 frames given, 6 expected)
        other = qwen_video_inputs(model, PROMPTS, [[(4, 112, 112)], [(84, 112), (4, 84, 112)]], seed=4)
        wrong = dict(inputs, pixel_values_videos=other["pixel_values_videos"], video_grid_thw=other["video_grid_thw"])
        with pytest.raises(UnsupportedInputError):
            with torch.no_grad():
                model(**wrong)
        # generate without mm_token_type_ids builds 1-D text positions: the video spans form no grid
        no_types = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        with pytest.raises(UnsupportedInputError, match="does not form"):
            generate_logits(model, no_types, 1)
        # pre-encoded features for fewer videos than the prompt has
        with torch.no_grad():
            vf = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            imf = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        vf.pooler_output = vf.pooler_output[:1]
        pre = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_values_videos")}
        with pytest.raises(UnsupportedInputError, match="placeholder spans"):
            with torch.no_grad():
                model(**pre, mm_encoder_outputs={"image": imf, "video": vf})
