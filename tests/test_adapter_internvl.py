"""InternVL (hf): the shared oracle suite for every registered method on single- and multi-tile images
(dynamic tiles + thumbnail), [CLS] signals merged like the pixel shuffle, and a saved checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from factories import tiny
from families import SignalProbe, check_oracles, family
from oracles import generate_logits
from test_method_oracles import CASES, NO_CASE, _selection_only

import vtprune
from vtprune.methods import method_class

FAM = "internvl"
PARAMS = [
    pytest.param(name, budget, options, id=f"{name}-{i}")
    for name, cases in CASES.items()
    for i, (budget, options) in enumerate(cases)
]


def test_registered_and_every_method_covered():
    assert "InternVLForConditionalGeneration" in vtprune.supported_model_classes()
    builtin = {n for n in vtprune.methods() if method_class(n).__module__.startswith("vtprune.")}
    assert builtin <= set(CASES) | set(NO_CASE)


@pytest.mark.parametrize("name,budget,options", PARAMS)
def test_shared_oracles(name, budget, options):
    check_oracles(FAM, name, budget, options, selection_only=_selection_only(name, options))


@pytest.mark.parametrize("name", ["fastv", "visionzip"])
def test_shared_oracles_eager(name):
    budget, options = CASES[name][0]
    check_oracles(FAM, name, budget, options, selection_only=_selection_only(name, options), attn="eager", alone=False)


def test_cls_signals_line_up_with_the_tiles():
    """cls_attention = each tile's [CLS] row at the feature layer (eager tower's own maps), averaged over the
    2×2 patches of each pixel-shuffled token; tiles in order, one crop each."""
    fam = family(FAM)
    model, inputs = fam.models["eager"], fam.batches[2]
    SignalProbe.seen.clear()
    with vtprune.pruned(model, "test_signal_probe", 0.5), torch.no_grad():
        model(**inputs)
    first, second = SignalProbe.seen
    with torch.no_grad():
        att = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[-1]
    cls = att[:, :, 0, 1:].float().mean(1).view(-1, 4, 2, 4, 2)  # (tiles, 8×8 patches) -> 2×2 groups
    want = cls.mean((2, 4)).flatten(1)  # (tiles, 16)
    assert torch.allclose(first.signals["cls_attention"], want[0], atol=1e-6)
    assert torch.allclose(second.signals["cls_attention"], want[1:].flatten(), atol=1e-6)
    assert second.grids == [(4, 4)] * 3 and torch.equal(second.crop.unique(), torch.arange(3))


def test_from_pretrained_round_trip_with_processor(tmp_path):
    """A saved checkpoint with its tokenizer and PIL image processor (dynamic tiles + thumbnail) reloads and
    prunes like the original."""
    from PIL import Image
    from saved_models import word_tokenizer
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        GotOcr2ImageProcessorPil,
        InternVLForConditionalGeneration,
    )

    from vtprune.testing import IMAGE_TOKEN_ID, INTERNVL_IMG_END_ID, INTERNVL_IMG_START_ID

    model = tiny("internvl", layers=4)
    side = model.config.vision_config.image_size[0]
    proc = GotOcr2ImageProcessorPil(
        size={"height": side, "width": side}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    tok = word_tokenizer(
        {IMAGE_TOKEN_ID: "<IMG_CONTEXT>", INTERNVL_IMG_START_ID: "<img>", INTERNVL_IMG_END_ID: "</img>"}
    )
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = InternVLForConditionalGeneration.from_pretrained(
        tmp_path, local_files_only=True, attn_implementation="sdpa"
    ).eval()
    loaded.generation_config.eos_token_id = None
    tok2 = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    proc2 = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    pix = proc2(images=[Image.new("RGB", (224, 112), (200, 30, 90))], return_tensors="pt")["pixel_values"]
    tiles = int(pix.shape[0])
    assert tiles == 3  # 2 tiles of a 224×112 image + the thumbnail
    ctx = " ".join(["<IMG_CONTEXT>"] * (int(model.config.image_seq_length) * tiles))
    ids = torch.tensor([tok2(f"<s> w5 <img> {ctx} </img> w7 w8")["input_ids"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix}
    for m in (model, loaded):
        vtprune.apply(m, "vispruner", 0.5)
    try:
        t0, l0 = generate_logits(model, inputs, 3)
        t1, l1 = generate_logits(loaded, inputs, 3)
    finally:
        vtprune.remove(model)
        vtprune.remove(loaded)
    assert torch.equal(t0, t1) and (l0 - l1).abs().max() <= 1e-5


def test_run_loads_a_saved_internvl(tmp_path):
    """`vtprune run` builds InternVL inputs itself (tokenizer + PIL GotOcr2 processor: tiles + thumbnail)."""
    from PIL import Image
    from saved_models import word_tokenizer
    from transformers import GotOcr2ImageProcessorPil

    from vtprune import runner
    from vtprune.testing import IMAGE_TOKEN_ID, INTERNVL_IMG_END_ID, INTERNVL_IMG_START_ID

    model = tiny("internvl", layers=2)
    side = model.config.vision_config.image_size[0]
    GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=True, max_patches=4).save_pretrained(
        tmp_path
    )
    word_tokenizer(
        {IMAGE_TOKEN_ID: "<IMG_CONTEXT>", INTERNVL_IMG_START_ID: "<img>", INTERNVL_IMG_END_ID: "</img>"}
    ).save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    lm = runner.load(tmp_path)
    assert lm.family == "internvl" and lm.processor is None
    res = runner.run_one(lm, Image.new("RGB", (224, 112), (9, 99, 199)), "w5 w6", "visionzip", 0.5, max_new_tokens=2)
    assert res["n_visual"] == 3 * 16 and 0 < res["retained_tokens"] <= 24
