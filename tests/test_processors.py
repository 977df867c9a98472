"""Real processors offline (issue 3, item 4): a locally built word-level tokenizer and the PIL image
processors turn real PIL images of different sizes into model inputs whose placeholder counts equal the
model's feature counts; a pruned `generate` runs from them (LLaVA-NeXT: `LlavaNextProcessor`; Qwen2.5-VL:
`Qwen2VLImageProcessorPil` + vtprune's id builder, since `Qwen2_5_VLProcessor` needs torchvision)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from factories import tiny
from oracles import generate_logits
from PIL import Image
from saved_models import word_tokenizer
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor, Qwen2VLImageProcessorPil

import vtprune
from vtprune.models.qwen_inputs import image_placeholder_count, qwen_processor_inputs
from vtprune.testing import (
    IMAGE_TOKEN_ID,
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    QWEN_VISION_END_ID,
    QWEN_VISION_START_ID,
)

torch.set_num_threads(1)

STEPS = 3


def _images(sizes, seed=0):
    """Real RGB PIL images of (H, W) sizes (random content)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _prompt_rows(inputs, image_id):
    return [int(n) for n in (inputs["input_ids"] == image_id).sum(1)]


# ------------------------------------------------------------------------------------------- LLaVA-NeXT


@pytest.fixture(scope="module")
def next_setup():
    model = tiny("llava_next", layers=4)
    tok = word_tokenizer({IMAGE_TOKEN_ID: "<image>"})
    tile = model.config.vision_config.image_size
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
            image_grid_pinpoints=model.config.image_grid_pinpoints,
        ),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )
    texts = ["<s> w5 w6 <image> w7 w8 w9", "<s> w10 <image> w11 w12 w13 w14 w15"]
    inputs = dict(proc(images=_images([(100, 160), (112, 60)]), text=texts, return_tensors="pt", padding=True))
    return model, inputs


def test_next_processor_placeholders_equal_feature_counts(next_setup):
    model, inputs = next_setup
    assert torch.equal(inputs["image_sizes"], torch.tensor([[100, 160], [112, 60]]))
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    counts = _prompt_rows(inputs, IMAGE_TOKEN_ID)
    assert counts == [int(f.shape[0]) for f in feats] == [16 + 6 * 9, 16 + 8 * 5]  # base + rows × (cols + newline)


@pytest.mark.parametrize("method,budget,options", [("fastv", 0.7, {}), ("visionzip", 0.3, {}),
                                                   ("random", 0.3, {})])
def test_next_pruned_generate_from_processor_inputs(next_setup, method, budget, options):
    model, inputs = next_setup
    stock_tokens, stock_logits = generate_logits(model, inputs, STEPS)
    with vtprune.pruned(model, method, 1000, **options):
        tokens, logits = generate_logits(model, inputs, STEPS)
    assert torch.equal(tokens, stock_tokens) and torch.equal(logits, stock_logits)
    with vtprune.pruned(model, method, budget, **options):
        tokens, logits = generate_logits(model, inputs, STEPS)
        rec = vtprune.last_run(model)
    assert tokens.shape == (2, STEPS) and torch.isfinite(logits).all()
    assert [s.n_visual for s in rec.samples] == [16 + 6 * 8, 16 + 8 * 4]
    assert all(0 < s.visual_per_layer[-1] < s.n_visual and s.layer_avg_tokens < s.n_visual for s in rec.samples)


# ------------------------------------------------------------------------------------------- Qwen2.5-VL


@pytest.fixture(scope="module")
def qwen_setup():
    model = tiny("qwen2_5_vl", layers=4)
    tok = word_tokenizer({
        QWEN_IMAGE_TOKEN_ID: "<|image_pad|>", QWEN_VIDEO_TOKEN_ID: "<|video_pad|>",
        QWEN_VISION_START_ID: "<|vision_start|>", QWEN_VISION_END_ID: "<|vision_end|>",
    })
    texts = [
        "<s> w5 w6 <|vision_start|><|image_pad|><|vision_end|> w7 w8 w9",
        "<s> w10 <|vision_start|><|image_pad|><|vision_end|> w11 w12 w13 w14",
    ]
    inputs = qwen_processor_inputs(model.config, tok, texts, _images([(100, 160), (90, 130)]),
                                   Qwen2VLImageProcessorPil())
    return model, tok, inputs


def test_qwen_image_processor_placeholders_equal_feature_rows(qwen_setup):
    model, tok, inputs = qwen_setup
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 12], [1, 6, 10]]  # smart-resized to multiples of 28 px
    assert inputs["pixel_values"].shape == (int(grid.prod(-1).sum()), 1176)
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], grid).pooler_output
    merged = [image_placeholder_count(model.config, g) for g in grid]
    assert _prompt_rows(inputs, QWEN_IMAGE_TOKEN_ID) == merged == [int(f.shape[0]) for f in feats] == [24, 15]
    assert inputs["mm_token_type_ids"].sum(1).tolist() == merged
    ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
    assert tok.decode(ids[:4]) == "<s> w5 w6 <|vision_start|>" and ids[4 + 24] == QWEN_VISION_END_ID
    with pytest.raises(ValueError, match="image tokens"):
        qwen_processor_inputs(model.config, tok, ["<s> w5"], _images([(56, 56)]), Qwen2VLImageProcessorPil())


@pytest.mark.parametrize("method,budget,options", [("fastv", 0.6, {}), ("vispruner", 0.3, {}),
                                                   ("random", 0.3, {"positions": "reindex"})])
def test_qwen_pruned_generate_from_processor_inputs(qwen_setup, method, budget, options):
    model, _, inputs = qwen_setup
    stock_tokens, stock_logits = generate_logits(model, inputs, STEPS)
    with vtprune.pruned(model, method, 1000, **options):
        tokens, logits = generate_logits(model, inputs, STEPS)
    assert torch.equal(tokens, stock_tokens) and torch.equal(logits, stock_logits)
    with vtprune.pruned(model, method, budget, **options):
        tokens, logits = generate_logits(model, inputs, STEPS)
        rec = vtprune.last_run(model)
    assert tokens.shape == (2, STEPS) and torch.isfinite(logits).all()
    assert [s.n_visual for s in rec.samples] == [24, 15]
    assert all(0 < s.visual_per_layer[-1] < s.n_visual and s.layer_avg_tokens < s.n_visual for s in rec.samples)
