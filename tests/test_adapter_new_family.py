"""Adding a model family is one adapter file (+ its tests): a trivial adapter for an HF class vtprune does not
ship an adapter for (`VipLlavaForConditionalGeneration`), defined in this file only, runs through the loader
(`vtprune.loading`: a saved directory and the placeholder path), `vtprune.apply` + `generate`, `vtprune show`
(the adapter's `display_layout`) and `vtprune bench` (the adapter's `synthetic_inputs`), without any other
file knowing the family."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vtprune
from vtprune import models, show
from vtprune.bench.core import BenchConfig, run_bench
from vtprune.loading import build_inputs, load, prompt_text, wrap_synthetic
from vtprune.models.base import ModelAdapter

torch.set_num_threads(1)
IMAGE_ID = 250


class VipLlavaAdapter(ModelAdapter):
    """VipLlava: CLIP tower (several feature layers concatenated) + Llama decoder, one side×side grid per image."""

    model_classes = ("VipLlavaForConditionalGeneration",)
    model_types = ("vipllava",)
    uses_processor = True
    image_kwargs = ("pixel_values", "vision_feature_layer")

    @property
    def side(self) -> int:
        vc = self.model.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def encode_images(self, kwargs: dict) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(pixel_values=kwargs["pixel_values"], return_dict=True)
        return list(out.pooler_output)

    def features_to_kwargs(self, feats: list[torch.Tensor]) -> dict:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(feats))}  # the model wants one tensor

    def image_layout(self, image_index: int, n: int):
        r = torch.arange(n)
        coords = torch.stack([r // self.side, r % self.side], 1)
        return [(self.side, self.side)], coords, torch.zeros(n, dtype=torch.long)

    def make_processor(self, tokenizer, image_processor):
        from transformers import LlavaProcessor

        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token=self.image_token_text(tokenizer))  # fmt: skip

    def default_image_processor(self):
        from transformers import CLIPImageProcessorPil

        side = int(self.model.config.vision_config.image_size)
        return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    def synthetic_inputs(self, prompts, image_size=None, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        n, size = self.side**2, int(self.model.config.vision_config.image_size)
        ids = torch.tensor([[*a, *[IMAGE_ID] * n, *b] for a, b in prompts])
        pixels = torch.randn(len(prompts), 3, size, size, generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def display_layout(self, image, inputs: dict, image_processor):
        from vtprune.models.display import square_grid_layout, unnormalise

        view = unnormalise(inputs["pixel_values"][0], image_processor)
        return square_grid_layout("vipllava", view, self.side, "model input")


def tiny_vipllava():
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig, VipLlavaForConditionalGeneration

    torch.manual_seed(0)
    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=112, patch_size=14),
        text_config=LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2),
        image_token_index=IMAGE_ID, vision_feature_layer=[-2, -1], image_seq_length=64,
        vision_feature_layers=[-2, -1],  # the key's name before transformers 5.2x (CI's oldest, 5.18, reads it)
    )  # fmt: skip
    model = VipLlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(models, "ADAPTERS", models.ADAPTERS)  # restored after the test
    return models.register_adapter(VipLlavaAdapter)


def test_unregistered_family_is_refused_with_the_supported_list():
    with pytest.raises(vtprune.errors.UnsupportedModelError, match="VipLlavaForConditionalGeneration.*supported"):
        vtprune.apply(tiny_vipllava(), "pool", 16)


def test_a_test_file_adapter_runs_apply_load_show_and_bench(registered, tmp_path):
    model = tiny_vipllava()
    loaded = wrap_synthetic(model, "tiny-vipllava")
    assert loaded.family == "vipllava" and isinstance(loaded.adapter, VipLlavaAdapter)
    image = Image.new("RGB", (160, 100), (180, 200, 220))
    assert prompt_text(loaded, "w5 w6") == "USER: <image>\nw5 w6 ASSISTANT:"  # the base class's default prompt
    inputs = build_inputs(loaded, image, "w5 w6")
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == 64

    # apply + generate through the engine: the record names 16 kept tokens
    vtprune.apply(model, "pool", 16)
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    rec = vtprune.last_run(model)
    assert rec.samples[0].n_visual == 64 and rec.retained_tokens == [16] and len(rec.selections) == 1
    vtprune.remove(model)

    # show: the adapter's layout, one cell per kept index
    res = show.show(loaded, image, "w5 w6", "pool,fastv@48", 16, out=tmp_path / "show.png", max_new_tokens=2)
    assert res.path.exists() and res.layout.n == 64 and res.layout.family == "vipllava"
    assert [r.get("error") for r in res.results] == [None, None], res.results
    assert [len(p.cells) for p in res.panels] == [16, 32]  # fastv@48 (layer-averaged): 32 kept at layer 2

    # bench: the adapter's synthetic inputs
    cfg = BenchConfig(model="tiny-vipllava", methods=["pool"], budgets=[16], repeats=1, warmup=0, new_tokens=2,
                      text_tokens=8, stock=False)  # fmt: skip
    rows = run_bench(cfg, progress=False, built=(model, None))["rows"]
    assert [r["retained_tokens"] for r in rows] == [64, 16] and rows[1]["selection_ms"] > 0

    # the loader: a saved directory finds its model class through the adapter's model_types
    model.save_pretrained(tmp_path / "vip")
    loaded.processor.save_pretrained(tmp_path / "vip")
    again = load(tmp_path / "vip")
    assert type(again.model).__name__ == "VipLlavaForConditionalGeneration" and again.processor is not None
    assert torch.equal(build_inputs(again, image, "w5 w6")["input_ids"], inputs["input_ids"])
