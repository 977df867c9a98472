"""Gemma 3: the shared oracles for every registered method (pre-LLM and in-LLM stages), the bidirectional
image-block mask kept exactly (a Gemma-specific masked reference with per-layer-type RoPE, sliding windows and
image blocks), the sliding-window limits, and a round trip."""

from __future__ import annotations

import pytest
import torch
from factories import tiny
from families import apply, check_oracles, family
from oracles import generate_logits, masked_reference_logits
from test_method_oracles import CASES, NO_CASE, _selection_only

import vtprune
from vtprune.errors import UnsupportedInputError
from vtprune.methods import method_class
from vtprune.testing import gemma3_inputs

FAM = "gemma3"
#: (method, version) refused on Gemma 3, with the words of the refusal
REFUSED = {("sparsevlm", "2.0"): "one RoPE table per layer type"}
PARAMS = [
    pytest.param(name, budget, options, id=f"{name}-{i}")
    for name, cases in CASES.items()
    for i, (budget, options) in enumerate(cases)
]


def test_registered_and_every_method_covered():
    assert "Gemma3ForConditionalGeneration" in vtprune.supported_model_classes()
    builtin = {n for n in vtprune.methods() if method_class(n).__module__.startswith("vtprune.")}
    assert builtin <= set(CASES) | set(NO_CASE)


@pytest.mark.parametrize("name,budget,options", PARAMS)
def test_shared_oracles(name, budget, options):
    """O1, O3, batch independence and, for selection-only methods, the masked reference (with Gemma's
    per-layer-type RoPE and masks and its image blocks: `oracles.masked_reference_logits`)."""
    if (name, options.get("version")) in REFUSED:
        model = family(FAM).models["sdpa"]
        apply(model, name, budget, options)
        try:
            with pytest.raises(UnsupportedInputError, match=REFUSED[name, options.get("version")]):
                generate_logits(model, family(FAM).batches[1], 1)
        finally:
            vtprune.remove(model)
        return
    check_oracles(FAM, name, budget, options, selection_only=_selection_only(name, options))


@pytest.mark.parametrize("name,budget,options", [("fastv", 0.6, {}), ("random", 0.5, {"layer": 1})])
def test_in_llm_groups_keep_the_image_blocks(name, budget, options):
    """In-LLM cuts rebuild both layer kinds' masks with the kept rows' bidirectional blocks: with a causal-only
    rebuild the pruned logits leave the reference."""
    from vtprune.models.gemma3 import Gemma3Adapter

    fam = family(FAM)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    apply(model, name, budget, options)
    stock_mask = Gemma3Adapter.layer_mask
    try:
        tokens, steps = generate_logits(model, inputs, 3)
        record = vtprune.last_run(model)
        Gemma3Adapter.layer_mask = lambda self, h, m, c, i, blocks=None: stock_mask(self, h, m, c, i, None)
        _, causal_steps = generate_logits(model, inputs, 3)
    finally:
        Gemma3Adapter.layer_mask = stock_mask
        vtprune.remove(model)
    ref = masked_reference_logits(model, inputs, record, tokens[:, :-1])
    prompt = inputs["input_ids"].shape[1]
    assert (steps - ref[:, prompt - 1 :]).abs().max() <= 1e-4
    assert (causal_steps[:, 0] - ref[:, prompt - 1]).abs().max() > 1e-3


def test_reference_matches_the_stock_model_unpruned():
    """The reference encodes the real masks: with nothing removed it is the stock model, and the stock model
    without its image blocks (no token_type_ids) differs."""
    fam = family(FAM)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    with torch.no_grad():
        stock = model(**inputs).logits
        causal = model(**dict(inputs, token_type_ids=None)).logits
    ref = masked_reference_logits(model, inputs, None, inputs["input_ids"][:, :0])
    valid = inputs["attention_mask"].bool()
    assert (stock - ref)[valid].abs().max() <= 1e-4
    assert (causal - stock)[valid].abs().max() > 1e-3


def test_eager_attention():
    check_oracles(FAM, "fastv", 0.6, {}, selection_only=True, attn="eager", alone=False)


def test_sliding_window_limits_are_refused():
    """A prompt longer than the sliding window is refused at the prefill, a generation reaching it at decode."""
    model = tiny("gemma3", layers=2, sliding_window=24)
    long = gemma3_inputs(model, [([1, 5], [7, 8, 9])], [2], seed=1)  # 2 + 2·18 + 3 = 41 > 24
    with vtprune.pruned(model, "random", 0.5), pytest.raises(UnsupportedInputError, match="sliding window"):
        model(**long)
    short = gemma3_inputs(model, [([1], [7])], [1], seed=1)  # 20 tokens: fits, generation crosses 24
    with vtprune.pruned(model, "random", 0.5):
        generate_logits(model, short, 3)  # positions up to 22: fine
        with pytest.raises(UnsupportedInputError, match="sliding window"):
            generate_logits(model, short, 8)


def test_from_pretrained_round_trip_with_processor(tmp_path):
    """A saved checkpoint with its tokenizer and PIL image processor reloads and prunes like the original."""
    from PIL import Image
    from saved_models import word_tokenizer
    from transformers import AutoImageProcessor, AutoTokenizer, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

    from vtprune.testing import GEMMA_BOI_ID, GEMMA_EOI_ID, IMAGE_TOKEN_ID

    model = tiny("gemma3", layers=4)
    side = model.config.vision_config.image_size
    proc = Gemma3ImageProcessorPil(size={"height": side, "width": side})
    tok = word_tokenizer(
        {IMAGE_TOKEN_ID: "<image_soft_token>", GEMMA_BOI_ID: "<start_of_image>", GEMMA_EOI_ID: "<end_of_image>"}
    )
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = Gemma3ForConditionalGeneration.from_pretrained(
        tmp_path, local_files_only=True, attn_implementation="sdpa"
    ).eval()
    loaded.generation_config.eos_token_id = None
    tok2 = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    proc2 = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    pix = proc2(images=[Image.new("RGB", (160, 100), (200, 30, 90))], return_tensors="pt")
    soft = " ".join(["<image_soft_token>"] * int(model.config.mm_tokens_per_image))
    ids = torch.tensor([tok2(f"<s> w5 <start_of_image> {soft} <end_of_image> w7 w8")["input_ids"]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": (ids == IMAGE_TOKEN_ID).long(),
        "pixel_values": pix["pixel_values"],
    }
    for m in (model, loaded):
        vtprune.apply(m, "visionzip", 0.5)
    try:
        t0, l0 = generate_logits(model, inputs, 3)
        t1, l1 = generate_logits(loaded, inputs, 3)
    finally:
        vtprune.remove(model)
        vtprune.remove(loaded)
    assert torch.equal(t0, t1) and (l0 - l1).abs().max() <= 1e-5


def test_run_loads_a_saved_gemma3(tmp_path):
    """`vtprune run` builds Gemma 3 inputs itself (soft tokens between <start_of_image> / <end_of_image>)."""
    from PIL import Image
    from saved_models import word_tokenizer
    from transformers import Gemma3ImageProcessorPil

    from vtprune import runner
    from vtprune.testing import GEMMA_BOI_ID, GEMMA_EOI_ID, IMAGE_TOKEN_ID

    model = tiny("gemma3", layers=4)
    side = model.config.vision_config.image_size
    Gemma3ImageProcessorPil(size={"height": side, "width": side}).save_pretrained(tmp_path)
    specials = {IMAGE_TOKEN_ID: "<image_soft_token>", GEMMA_BOI_ID: "<start_of_image>", GEMMA_EOI_ID: "<end_of_image>"}
    word_tokenizer(specials).save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    lm = runner.load(tmp_path)
    assert lm.family == "gemma3" and lm.processor is None
    res = runner.run_one(lm, Image.new("RGB", (160, 100), (9, 99, 199)), "w5 w6", "fastv", 0.6, max_new_tokens=2)
    assert res["n_visual"] == 16 and res["layer_avg_tokens"] < 16
