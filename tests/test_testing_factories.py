"""`vtprune.testing.tiny_*`: every keyword is honoured or refused (issue 23: `tiny_llava_next(hidden=32)` used to
be swallowed by `**kw` and give the default 64-wide model); the tests' shared model source hands out one
instance per configuration."""

from __future__ import annotations

import inspect

import pytest
import torch
from factories import BUILDERS, tiny

from vtprune import testing


@pytest.mark.parametrize("name", sorted(f.__name__ for f in BUILDERS.values()))
def test_unknown_keywords_raise_a_type_error_naming_the_accepted_ones(name):
    factory = getattr(testing, name)
    accepted = list(inspect.signature(factory).parameters)
    assert all(p.kind is p.KEYWORD_ONLY for p in inspect.signature(factory).parameters.values())
    with pytest.raises(TypeError, match=rf"{name}\(\) got unknown keyword argument\(s\) 'hiden'") as err:
        factory(layers=1, hiden=32)
    assert str(err.value).endswith("it accepts the keywords " + ", ".join(accepted))
    with pytest.raises(TypeError, match="positional arguments"):
        factory(1)


def test_tiny_llava_next_honours_every_size_keyword():
    model = testing.tiny_llava_next(
        layers=1, hidden=32, heads=2, kv_heads=1, intermediate=48, vocab=300, vision_hidden=16, vision_layers=2,
        dtype=torch.bfloat16,
    )
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (32, 2, 1)
    assert (text.intermediate_size, text.vocab_size, text.num_hidden_layers) == (48, 300, 1)
    assert (vision.hidden_size, vision.num_hidden_layers) == (16, 2)
    assert model.dtype == torch.bfloat16 and model.model.image_newline.shape == (32,)
    inputs = testing.llava_next_inputs(model.float(), [([1, 2], [3, 4])], [(100, 160)])
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == 300


@pytest.mark.parametrize("name", ["tiny_llava_onevision", "tiny_internvl"])
def test_qwen2_decoder_factories_honour_the_width(name):
    text = getattr(testing, name)(layers=1, hidden=32, heads=2, kv_heads=1).config.text_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (32, 2, 1)
    assert text.intermediate_size == 64


def test_defaults_are_unchanged():
    """The explicit keywords default to the sizes the models had before (64 wide, GQA 4/2, 32-wide 3-layer ViT)."""
    for model in (testing.tiny_llava_next(layers=1), testing.tiny_internvl(layers=1)):
        text = model.config.text_config
        assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
        assert text.intermediate_size == 128 and text.vocab_size == 256 and model.dtype == torch.float32
    vision = testing.tiny_llava_next(layers=1).config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size) == (32, 3, 64)


def test_shared_source_builds_each_configuration_once():
    a = tiny("llava", layers=1, image_size=56, attn="eager")
    assert tiny("llava", attn="eager", image_size=56, layers=1) is a  # keyword order does not matter
    assert tiny("llava", layers=1, image_size=56) is not a
    with pytest.raises(ValueError, match="unknown tiny model kind 'llama'"):
        tiny("llama")
