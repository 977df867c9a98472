"""Signals without eager attention equal eager `output_attentions` (spec README §9, fastv.md property 2)."""

from __future__ import annotations

import pytest
import torch

from vtprune.engine import signals as sig
from vtprune.models import adapter_for
from vtprune.testing import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def eager_run():
    model = tiny_llava(attn="eager", layers=4)
    inputs = llava_inputs(model, [([1, 5, 6], [7, 8, 9]), ([1], [7, 8, 9, 10, 11])], seed=5)
    captured = {}

    def grab(idx):
        def hook(layer, args, kwargs):
            captured[idx] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

        return hook

    handles = [
        lay.register_forward_pre_hook(grab(i), with_kwargs=True)
        for i, lay in enumerate(model.model.language_model.layers)
    ]
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    for h in handles:
        h.remove()
    return model, inputs, out, captured


@pytest.mark.parametrize("layer_idx", [0, 1, 3])
def test_last_token_attention_equals_eager(eager_run, layer_idx):
    model, inputs, out, captured = eager_run
    hidden, pe = captured[layer_idx]
    ad = adapter_for(model)
    layer = model.model.language_model.layers[layer_idx]
    with torch.no_grad():
        mine = sig.last_token_attention(ad, layer, hidden, pe, inputs["attention_mask"])
        from_cache = sig.last_token_attention(
            ad, layer, hidden, pe, inputs["attention_mask"], out.past_key_values.layers[layer_idx].keys
        )
    eager = out.attentions[layer_idx][:, :, -1].float().mean(1)
    assert (mine - eager).abs().max() <= 1e-6
    assert (from_cache - eager).abs().max() <= 1e-6


def test_mean_received_attention_equals_eager(eager_run):
    model, inputs, out, captured = eager_run
    hidden, pe = captured[1]
    mask = inputs["attention_mask"]
    with torch.no_grad():
        mine = sig.mean_received_attention(
            adapter_for(model), model.model.language_model.layers[1], hidden, pe, mask, chunk=100
        )
    probs = out.attentions[1].float().mean(1) * mask[:, :, None]  # (B, q, k), valid query rows only
    counts = mask.flip(1).cumsum(1).flip(1).clamp(min=1)
    ref = probs.sum(1) / counts
    valid = mask.bool()
    assert (mine[valid] - ref[valid]).abs().max() <= 1e-6


def test_key_norms_of_head_mean_keys(eager_run):
    _, _, out, _ = eager_run
    keys = out.past_key_values.layers[2].keys
    norms = sig.key_norms(keys)
    assert norms.shape == keys.shape[::2][:1] + keys.shape[2:3]
    assert torch.allclose(norms[0, 7], keys[0, :, 7].mean(0).norm())


def test_clip_cls_attention_and_keys_equal_eager():
    model = tiny_llava(attn="eager", layers=2)
    ad = adapter_for(model)
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    got = {}
    attn = ad.vision_attention_module()
    handle = attn.register_forward_pre_hook(
        lambda m, a, k: got.update(ad.vision_signals(m, k.get("hidden_states", a[0] if a else None))), with_kwargs=True
    )
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    handle.remove()
    layer = len(model.model.vision_tower.encoder.layers) - 2  # vision_feature_layer = -2
    eager = out.attentions[layer][:, :, 0, 1:].mean(1)
    assert got["cls_attention"].shape == (2, 576)
    assert (got["cls_attention"] - eager).abs().max() <= 1e-6
    x = model.model.vision_tower.encoder.layers[layer].layer_norm1(out.hidden_states[layer])
    assert torch.allclose(got["vision_keys"], attn.k_proj(x)[:, 1:], atol=1e-6)
