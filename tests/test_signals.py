"""Signals without eager attention equal eager `output_attentions` (spec README §9, fastv.md property 2)."""

from __future__ import annotations

import pytest
import torch
from factories import tiny

import vtprune
from vtprune import hf_compat as hf
from vtprune.engine import signals as sig
from vtprune.errors import VtpruneError
from vtprune.methods import KeepPlan, PruningMethod, Stage
from vtprune.models import adapter_for
from vtprune.testing import llava_inputs, qwen_inputs


@pytest.fixture(scope="module")
def eager_run():
    model = tiny("llava", attn="eager", layers=4)
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
            ad, layer, hidden, pe, inputs["attention_mask"], hf.output_cache(out).layers[layer_idx].keys
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
    keys = hf.output_cache(out).layers[2].keys
    norms = sig.key_norms(keys)
    assert norms.shape == keys.shape[::2][:1] + keys.shape[2:3]
    assert torch.allclose(norms[0, 7], keys[0, :, 7].mean(0).norm())


def test_clip_cls_attention_and_keys_equal_eager():
    model = tiny("llava", attn="eager", layers=2)
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


# --- signals for text-conditioned and multi-stage methods ----------------------------------------------
class _Capture(PruningMethod):
    """Keeps the first k candidates at each stage and records what it was given."""

    name = "capture"

    def __init__(self, stages, wanted):
        super().__init__()
        self._stages, self._wanted, self.seen = stages, wanted, []

    def stages(self):
        return self._stages

    def signals(self, stage_index):
        return frozenset(self._wanted[stage_index])

    def schedule(self, n, budget, mode, num_layers):
        return [max(1, n // (2 + i)) for i in range(len(self._stages))]

    def select(self, stage_index, image, k):
        image.memo.setdefault("stages", []).append(stage_index)
        self.seen.append((stage_index, image))
        return KeepPlan(torch.arange(k))


def _eager_attentions(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_attentions=True).attentions


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_suffix_attention_and_embeddings_equal_stock(family):
    """suffix_attention rows == eager attention of layer k−1 (question-span rows × candidate columns);
    suffix/question/visual embeddings == the model's own input embeddings; memo persists across stages."""
    if family == "llava":
        model = tiny("llava", attn="eager", layers=4)
        inputs = llava_inputs(model, [([1, 5, 6], [7, 8, 9]), ([1], [7, 8, 9, 10, 11])], seed=5)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    else:
        model = tiny("qwen2_5_vl", attn="eager", layers=4)
        inputs = qwen_inputs(model, [([1, 5, 6], [7, 8, 9]), ([1], [7, 8, 9, 10, 11])], [(56, 84), (84, 56)], seed=5)
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    attentions = _eager_attentions(model, inputs)
    text = {"suffix_attention", "suffix_embeddings", "question_embeddings", "visual_embeddings"}
    wanted = [{"visual_embeddings"}, text]
    method = _Capture((Stage("llm", 1), Stage("llm", 2)), wanted)
    vtprune.apply(model, method, 0.5)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        vtprune.remove(model)
    embed = model.get_input_embeddings()
    ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    vision_marks = [getattr(model.config, n, None) for n in ("vision_start_token_id", "vision_end_token_id")]
    specials = {image_id, 0, *vision_marks}
    second = [img for stage, img in method.seen if stage == 1]
    for b, img in enumerate(second):
        rows = (ids[b] == image_id).nonzero().flatten()
        suffix = torch.arange(int(rows[-1]) + 1, ids.shape[1])
        assert torch.equal(img.signals["suffix_embeddings"], embed(ids[b, suffix]).float())
        q = torch.tensor([int(i) for i in ids[b, suffix] if int(i) not in specials])
        assert torch.equal(img.signals["question_embeddings"], embed(q).float())
        assert torch.allclose(img.signals["visual_embeddings"], feats[b][img.original_index].float())
        assert img.signals["suffix_attention"].shape == (len(suffix), img.n)  # after the first cut
        assert img.memo["stages"] == [0, 1]
    for b, img in enumerate(img for stage, img in method.seen if stage == 0):
        assert "suffix_attention" not in img.signals
        assert torch.allclose(img.signals["visual_embeddings"], feats[b].float())
    # suffix attention against eager: a single cut at llm:1 sees layer 0 of the unpruned run
    method = _Capture((Stage("llm", 1),), [{"suffix_attention"}])
    vtprune.apply(model, method, 0.5)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        vtprune.remove(model)
    for b, (_, img) in enumerate(method.seen):
        rows = (ids[b] == image_id).nonzero().flatten()
        suffix = torch.arange(int(rows[-1]) + 1, ids.shape[1])
        eager = attentions[0][b].float().mean(0)[suffix][:, rows]
        assert (img.signals["suffix_attention"] - eager).abs().max() <= 1e-6


def test_vision_head_keys_and_projector_features():
    model = tiny("llava", layers=2)
    inputs = llava_inputs(model, [([1, 5], [7, 8])], seed=3)
    method = _Capture((Stage("vision"),), [{"vision_keys", "vision_head_keys", "vision_features"}])
    vtprune.apply(model, method, 64)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        vtprune.remove(model)
    ((_, img),) = method.seen
    heads = model.config.vision_config.num_attention_heads
    keys = img.signals["vision_keys"]
    assert torch.allclose(img.signals["vision_head_keys"], keys.view(keys.shape[0], heads, -1).mean(1), atol=1e-6)
    projected = model.model.multi_modal_projector(img.signals["vision_features"])
    assert torch.allclose(projected, img.features, atol=1e-5)


def test_noun_embeddings_need_a_tokenizer():
    model = tiny("llava", layers=2)
    method = _Capture((Stage("pre_llm"),), [{"noun_embeddings"}])
    with pytest.raises(VtpruneError, match="tokenizer"):
        vtprune.apply(model, method, 64)
    assert vtprune.session_of(model) is None
