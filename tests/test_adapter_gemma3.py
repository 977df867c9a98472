"""Gemma 3: the shared oracles for every registered method that prunes before the LLM, the asserted refusal of
in-LLM stages, the bidirectional image-block mask kept exactly (a Gemma-specific masked reference with
per-layer-type RoPE, sliding windows and image blocks), the sliding-window limits, and a round trip."""

from __future__ import annotations

import pytest
import torch
from families import check_oracles, family
from oracles import generate_logits
from test_method_oracles import CASES, NO_CASE, _selection_only

import vtprune
from vtprune.errors import UnsupportedInputError
from vtprune.methods import method_class
from vtprune.testing import gemma3_inputs, tiny_gemma3

FAM = "gemma3"
PARAMS = [
    pytest.param(name, budget, options, id=f"{name}-{i}")
    for name, cases in CASES.items()
    for i, (budget, options) in enumerate(cases)
]


def gemma_masked_reference(model, inputs: dict, record, new_tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of the unpruned prompt + new tokens with the removed soft tokens masked as keys in every
    layer, written against the stock modules: per-layer-type RoPE tables and masks, full = causal OR image
    block, sliding = that AND the window (kv > q − W), image blocks = runs of soft tokens."""
    cfg, tc = model.config, model.config.text_config
    ids = torch.cat([inputs["input_ids"], new_tokens], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], 1).bool()
    lm = model.model.language_model
    is_img = ids == cfg.image_token_id
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output
        h = model.get_input_embeddings()(ids)
        h[is_img] = feats.reshape(-1, feats.shape[-1]).to(h.dtype)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long()
        key_ok = mask.clone()
        for b, sample in enumerate(record.samples):
            rows = is_img[b].nonzero().flatten()
            for ev in sample.events:
                gone = torch.ones(len(rows), dtype=torch.bool)
                gone[ev.keep_idx] = False
                key_ok[b, rows[gone]] = False
        length = ids.shape[1]
        start = is_img & ~torch.nn.functional.pad(is_img, (1, 0))[:, :-1]
        block = torch.where(is_img, start.long().cumsum(1), -1)  # (B, T) image run id, −1 on text
        q, k = torch.arange(length)[:, None], torch.arange(length)[None]
        same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
        full = ((k <= q)[None] | same) & key_ok[:, None, :]
        allowed = {"full_attention": full, "sliding_attention": full & (k > q - tc.sliding_window)[None]}
        neg = torch.finfo(h.dtype).min
        eye = torch.eye(length, dtype=torch.bool)[None]
        for i, layer in enumerate(lm.layers):
            kind = tc.layer_types[i]
            add = torch.zeros(h.shape[0], 1, length, length, dtype=h.dtype).masked_fill(
                ~(allowed[kind] | eye)[:, None], neg
            )
            h = layer(h, attention_mask=add, position_embeddings=lm.rotary_emb(h, pos, kind), position_ids=pos)
        return model.lm_head(lm.norm(h))


def _in_llm(name: str, options: dict) -> bool:
    """Whether the method (with these options) has an llm:k stage, read from its session on LLaVA-NeXT."""
    model = family("llava_next").models["sdpa"]
    opts = {k: v for k, v in options.items() if k not in ("budget_mode", "positions")}
    with vtprune.pruned(model, name, 0.5, **opts):
        return any(s.kind == "llm" for s in vtprune.session_of(model).stages)


def test_registered_and_every_method_covered():
    assert "Gemma3ForConditionalGeneration" in vtprune.supported_model_classes()
    builtin = {n for n in vtprune.methods() if method_class(n).__module__.startswith("vtprune.")}
    assert builtin <= set(CASES) | set(NO_CASE)


@pytest.mark.parametrize("name,budget,options", PARAMS)
def test_shared_oracles_or_refusal(name, budget, options):
    """Pre-LLM methods: O1, O3, batch independence and (selection-only) the Gemma masked reference; methods
    with an llm:k stage: refused at apply, naming the stage."""
    fam = family(FAM)
    model = fam.models["sdpa"]
    if _in_llm(name, options):
        opts = {k: v for k, v in options.items() if k not in ("budget_mode", "positions")}
        with pytest.raises(UnsupportedInputError, match="prunes inside the LLM"):
            vtprune.apply(model, name, budget, **opts)
        assert "_vtprune" not in model.__dict__
        return
    record = check_oracles(FAM, name, budget, options, selection_only=False)
    if _selection_only(name, options) and options.get("positions", "keep") == "keep":
        inputs = fam.batches[2]
        vtprune.apply(model, name, budget, **options)
        try:
            tokens, steps = generate_logits(model, inputs, 3)
            record = vtprune.last_run(model)
        finally:
            vtprune.remove(model)
        ref = gemma_masked_reference(model, inputs, record, tokens[:, :-1])
        prompt = inputs["input_ids"].shape[1]
        assert (steps - ref[:, prompt - 1 :]).abs().max() <= 1e-4


def test_reference_matches_the_stock_model_unpruned():
    """The hand-built reference is the stock model when nothing is removed (so it encodes the real masks)."""
    fam = family(FAM)
    model, inputs = fam.models["sdpa"], fam.batches[2]
    with vtprune.pruned(model, "random", 10**6), torch.no_grad():
        stock = model(**inputs).logits
        record = vtprune.last_run(model)
    ref = gemma_masked_reference(model, inputs, record, inputs["input_ids"][:, :0])
    valid = inputs["attention_mask"].bool()
    assert (stock - ref)[valid].abs().max() <= 1e-4
    no_block = dict(inputs, token_type_ids=None)  # without the bidirectional blocks the logits differ
    with torch.no_grad():
        causal = model(**no_block).logits
    assert (causal - stock)[valid].abs().max() > 1e-3


def test_eager_attention():
    check_oracles(FAM, "random", 0.3, {}, selection_only=False, attn="eager", alone=False)


def test_sliding_window_limits_are_refused():
    """A prompt longer than the sliding window is refused at the prefill, a generation reaching it at decode."""
    model = tiny_gemma3(layers=2, sliding_window=24)
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

    model = tiny_gemma3(layers=4)
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
