"""Tokenizer / processor round trip, 576 placeholders, model geometry, training-path equivalence."""

from __future__ import annotations

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from vtprune.testbed.data import Packing, encode_conversation, pixels
from vtprune.testbed.features import vision_features
from vtprune.testbed.model import TINY, build_config, build_model
from vtprune.testbed.questions import Question, answer_vocabulary, question_words
from vtprune.testbed.scenes import make_scene, render
from vtprune.testbed.tokenizer import build_processor, build_tokenizer, prompt, vocabulary


def test_tokenizer_round_trip():
    tok = build_tokenizer()
    text = "what colour is the circle ?"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    for w in (*question_words(), *answer_vocabulary()):
        assert tok.convert_tokens_to_ids(w) != tok.unk_token_id, w
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w  # single-token words
    assert tok.convert_tokens_to_ids("<image>") == vocabulary()["<image>"]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2 and tok.padding_side == "left"


def test_processor_expands_576_placeholders_and_reloads(tmp_path):
    proc = build_processor()
    image = render(make_scene(0, 0))
    out = proc(images=image, text=prompt("what number is in the box ?"), return_tensors="pt")
    ids = out["input_ids"][0]
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == 576
    assert out["pixel_values"].shape == (1, 3, 336, 336)
    assert torch.equal(out["pixel_values"], pixels([image]))  # training path = processor path
    proc.save_pretrained(tmp_path)
    for cls in (AutoProcessor, LlavaProcessor):
        again = cls.from_pretrained(tmp_path)
        out2 = again(images=image, text=prompt("what number is in the box ?"), return_tensors="pt")
        assert torch.equal(out2["input_ids"], out["input_ids"])
        assert torch.equal(out2["pixel_values"], out["pixel_values"])


def test_packed_first_turn_equals_inference_prompt():
    proc = build_processor()
    q = Question("digit", "what number is in the box ?", "7")
    ids, labels = encode_conversation([q, Question("exist", "is there a red cross ?", "no")], Packing(2))
    ref = proc(images=render(make_scene(0, 0)), text=prompt(q.text))["input_ids"][0]
    assert ids[: len(ref)] == list(ref)
    assert labels[len(ref)] == vocabulary()["7"] and labels[len(ref) + 1] == vocabulary()["</s>"]
    assert len(ids) == Packing(2).length


def test_llava_15_geometry(tmp_path):
    cfg = build_config()
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_seq_length == 576
    model = build_model(TINY).eval()
    proc = build_processor()
    image = render(make_scene(0, 1))
    inputs = proc(images=[image, image], text=[prompt("what shape is the red object ?"),
                                               prompt("what number is in the box ?")],
                  return_tensors="pt", padding=True)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        assert torch.stack(list(feats)).shape == (2, 576, TINY.text_width)
        mine = model.model.multi_modal_projector(vision_features(model, inputs["pixel_values"]))
        assert torch.allclose(torch.stack(list(feats)), mine, atol=1e-5)
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    model.save_pretrained(tmp_path)
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(again(**inputs).logits, logits, atol=1e-5)
