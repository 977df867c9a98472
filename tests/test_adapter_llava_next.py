"""LLaVA-NeXT adapter on a tiny AnyRes model (56 px tiles of 4×4 tokens, two images of different sizes):
layout and newline policy, bad input, per-tile vision signals and vision-stage
methods. The shared oracles (O1-O3, batch independence, remove, from_pretrained) run in test_method_oracles.py."""

from __future__ import annotations

import pytest
import torch
from factories import NEXT_SIZES as SIZES  # 16 + 6×8 = 64 and 16 + 8×4 = 48 tokens
from families import SignalProbe, family
from oracles import generate_logits, masked_reference_logits
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtprune
from vtprune.errors import UnsupportedInputError
from vtprune.methods import (
    ImageTokens,
    build_method,
)

torch.set_num_threads(1)

STEPS = 3


@pytest.fixture(scope="module")
def nmodels():
    """The session's shared 6-layer LLaVA-NeXT models (sdpa, eager): `families.family`."""
    return family("llava_next").models


@pytest.fixture(scope="module")
def nbatches():
    """Batches of one and two prompts (`factories.PROMPTS`) with images of `SIZES`."""
    return family("llava_next").batches


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


# ------------------------------------------------------------------------- per-crop vision signals (spec §8)


def _eager_reference(model, inputs, extra=False):
    """Per image, in candidate order: (cls (n,), keys (n, C), feats (n, D)), from an eager CLIP run of all
    tiles (`output_attentions=True`), re-packed by matching each packed (non-newline) feature row of the
    stock `get_image_features` to the per-tile projector output it came from. extra=True appends
    {vision_features (n, C), vision_head_keys (n, d_h), vision_cls_features (tiles, C)} (pre-projector)."""
    cfg, vt = model.config, model.model.vision_tower
    layer = len(vt.encoder.layers) + cfg.vision_feature_layer  # -2: attentions[layer] feeds hidden_states[-2]
    tiles = [
        image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for s in inputs["image_sizes"].tolist()
    ]
    pixels = torch.cat([p[:t] for p, t in zip(inputs["pixel_values"], tiles, strict=True)])
    keys = []
    handle = vt.encoder.layers[layer].self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o))
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            out = vt(pixels, output_attentions=True, output_hidden_states=True)
            tile_feats = model.model.multi_modal_projector(out.hidden_states[cfg.vision_feature_layer][:, 1:])
            packed = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            ).pooler_output
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
        handle.remove()
    cls = out.attentions[layer][:, :, 0, 1:].mean(1)  # (T, side²): each tile's own [CLS] row
    key = keys[0][:, 1:]  # (T, side², C)
    hidden = out.hidden_states[cfg.vision_feature_layer]  # (T, 1 + side², C) the feature layer's output
    head_key = key.view(*key.shape[:2], cfg.vision_config.num_attention_heads, -1).mean(2)
    refs = []
    for i, (c, k, f, h, hk) in enumerate(
        zip(
            cls.split(tiles),
            key.split(tiles),
            tile_feats.split(tiles),
            hidden.split(tiles),
            head_key.split(tiles),
            strict=True,
        )
    ):
        rows = packed[i]
        cand = rows[~(rows == model.model.image_newline).all(-1)]
        dist = (cand[:, None] - f.flatten(0, 1)[None]).abs().amax(-1)
        j = dist.argmin(1)
        assert float(dist.min(1).values.max()) < 1e-5 and len(j.unique()) == len(j)
        ref = (c.flatten()[j], k.flatten(0, 1)[j], cand)
        if extra:
            clip = {
                "vision_features": h[:, 1:].flatten(0, 1)[j],
                "vision_head_keys": hk.flatten(0, 1)[j],
                "vision_cls_features": h[:, 0],
            }
            ref = (*ref, clip)
        refs.append(ref)
    return refs


def test_vision_signals_per_crop_equal_eager_repacked(nmodels, nbatches):
    """cls_attention / vision_keys of each image line up with its candidates: base tile, then the unpadded
    tile area (rows cut through tiles here), each token scored by its own tile's [CLS] row."""
    model, inputs = nmodels["sdpa"], nbatches[2]
    refs = _eager_reference(model, inputs)
    assert [len(r[0]) for r in refs] == [64, 48]
    with vtprune.pruned(model, "test_signal_probe", 0.3):
        for run in ("generate", "forward"):  # capture in generate's encoding / in the engine's own
            SignalProbe.seen.clear()
            if run == "generate":
                generate_logits(model, inputs, 1)
            else:
                with torch.no_grad():
                    model(**inputs)
            assert len(SignalProbe.seen) == 2
            for img, (cls, keys, feats) in zip(SignalProbe.seen, refs, strict=True):
                assert (img.features - feats).abs().max() <= 1e-6  # sdpa vs eager tower: same rows, same order
                assert img.signals["cls_attention"].shape == (img.n,)
                assert (img.signals["cls_attention"] - cls).abs().max() <= 1e-6
                assert (img.signals["vision_keys"] - keys).abs().max() <= 1e-5


VISION_METHODS = [("visionzip", {}), ("vispruner", {})]


@pytest.mark.parametrize("method,options", VISION_METHODS)
def test_vision_methods_run_on_next(nmodels, nbatches, method, options):
    """visionzip / vispruner on NeXT: O1 bypass bit-identical, selection == the method on eager re-packed
    signals (pre-projector features and per-tile [CLS] rows included), O2/O3 masking reference (vispruner;
    VisionZip's inserted [CLS] tokens have no row there: tests/test_visionzip.py), batch of two == each alone."""
    model, inputs = nmodels["sdpa"], nbatches[2]
    with torch.no_grad():
        stock = model(**inputs).logits
    stock_tokens, stock_steps = generate_logits(model, inputs, STEPS)
    with vtprune.pruned(model, method, 1000, **options):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, stock)
        tokens, steps = generate_logits(model, inputs, STEPS)
        assert torch.equal(tokens, stock_tokens) and torch.equal(steps, stock_steps)

    refs = _eager_reference(model, inputs, extra=True)
    with vtprune.pruned(model, method, 0.3, **options):
        tokens, logits = generate_logits(model, inputs, STEPS)
        record = vtprune.last_run(model)
        ad = model._vtprune.adapter
        kept = [s.events[0].keep_idx for s in record.samples]
        for b, (cls, keys, feats, clip) in enumerate(refs):
            grids, coords, crop = ad.image_layout(b, len(cls))
            img = ImageTokens(
                feats,
                coords,
                crop,
                grids,
                torch.arange(len(cls)),
                {"cls_attention": cls, "vision_keys": keys, **clip},
                tile=ad.image_tiles(b),
                project=model.model.multi_modal_projector,
            )
            plan = build_method(method, options).select(0, img, record.samples[b].retained_tokens)
            assert torch.equal(plan.keep_idx, kept[b])
            assert record.samples[b].events[0].inserted == [plan.n_inserted]
            assert int((crop[kept[b]] == 0).sum()) >= 1 and int((crop[kept[b]] == 1).sum()) >= 1
        if method == "vispruner":
            ref = masked_reference_logits(model, inputs, record, tokens[:, :-1], None)
            prompt = inputs["input_ids"].shape[1]
            assert (logits - ref[:, prompt - 1 :]).abs().max() <= 1e-4
        for b in range(2):
            pad = int((inputs["attention_mask"][b] == 0).sum())
            alone = {
                "input_ids": inputs["input_ids"][b : b + 1, pad:],
                "attention_mask": inputs["attention_mask"][b : b + 1, pad:],
                "pixel_values": inputs["pixel_values"][b : b + 1],
                "image_sizes": inputs["image_sizes"][b : b + 1],
            }
            t1, l1 = generate_logits(model, alone, STEPS)
            assert torch.equal(vtprune.last_run(model).samples[0].events[0].keep_idx, kept[b])
            assert (l1[0] - logits[b]).abs().max() <= 1e-4 and torch.equal(t1[0], tokens[b])
