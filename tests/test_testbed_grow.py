"""Depth growth of a built-in model's decoder: the grown model computes exactly what the shallow one did,
and training then moves its new layers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vtprune.testbed import data_v3
from vtprune.testbed.grow import grow_decoder, growth_plan
from vtprune.testbed.train_v3 import TINY_V3


def _model(layers: int = 2):
    model = data_v3.build_model(replace(TINY_V3, text_layers=layers), seed=3)
    with torch.no_grad():  # HF init leaves some projections tiny; random weights make every layer matter
        for p in model.model.language_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _inputs(model, n: int = 2):
    from vtprune.testbed.questions import Question
    from vtprune.testbed.splits import calibration_split

    split = calibration_split()
    ids = [data_v3.encode_conversation([Question("colour", "what colour is the circle ?", "red")],
                                       data_v3.Packing(1))[0] for _ in range(n)]
    ids = torch.tensor(ids)
    return {"input_ids": ids, "attention_mask": (ids != data_v3.vocabulary()["<pad>"]).long(),
            "pixel_values": data_v3.scene_pixels(split, list(range(n)))}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_growth_plan_places_trained_layers_and_rejects_bad_requests():
    assert growth_plan(4, 32) == [(i // 8, i % 8 == 0) for i in range(32)]
    assert growth_plan(2, 5, "front") == [(0, True), (1, True), (1, False), (1, False), (1, False)]
    assert growth_plan(3, 3) == [(0, True), (1, True), (2, True)]
    with pytest.raises(ValueError, match="need layers >= 4"):
        growth_plan(4, 3)
    # spread_next: the same positions, each copy from the trained layer after it (the last block: the last layer)
    assert growth_plan(4, 32, "spread_next") == [(min(3, i // 8 + (i % 8 > 0)) if i < 24 else 3, i % 8 == 0)
                                                 for i in range(32)]
    assert growth_plan(2, 5, "spread_next") == [(0, True), (1, False), (1, True), (1, False), (1, False)]
    with pytest.raises(ValueError, match="accepted: spread, spread_next, front"):
        growth_plan(2, 4, "middle")


@pytest.mark.parametrize("placement", ["spread", "spread_next", "front"])
def test_grown_model_computes_exactly_the_shallow_models_function(placement):
    model = _model(2)
    inputs = _inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grown = grow_decoder(model, 6, placement)
    assert grown.config.text_config.num_hidden_layers == 6 and model.config.text_config.num_hidden_layers == 2
    assert torch.equal(_logits(grown, inputs), _logits(model, inputs))  # bit-exact, not approximately
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # source untouched
    # cached greedy decoding agrees too (each new layer holds its own KV entries)
    out_a = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    out_b = grown.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out_a, out_b)


def test_copies_without_zeroed_outputs_would_change_the_function():
    """The oracle above can fail: the zeroed residual outputs are what makes the copies neutral."""
    model = _model(2)
    inputs = _inputs(model)
    grown = grow_decoder(model, 4, "front")
    with torch.no_grad():
        grown.model.language_model.layers[3].self_attn.o_proj.weight.copy_(
            model.model.language_model.layers[1].self_attn.o_proj.weight)
    assert not torch.allclose(_logits(grown, inputs), _logits(model, inputs))


def test_copy_output_scale_gives_copies_a_fraction_of_their_sources_outputs(tmp_path):
    """`copy_output_scale`: copies' o_proj / down_proj = scale × their source's (trained layers and every other
    weight unchanged), so the function changes; 0 is the default, exact growth; out of [0, 1] is refused."""
    from vtprune.cli import main
    from vtprune.testbed.builtin import resolve_model
    from vtprune.testbed.train import export

    model = _model(2)
    inputs = _inputs(model)
    exact, scaled = grow_decoder(model, 6, "spread_next"), grow_decoder(model, 6, "spread_next", 0.1)
    src = model.model.language_model.layers
    for i, (s, trained) in enumerate(growth_plan(2, 6, "spread_next")):
        for name, w in scaled.model.language_model.layers[i].state_dict().items():
            source = src[s].state_dict()[name]
            outputs = name.startswith(("self_attn.o_proj.", "mlp.down_proj."))
            assert torch.equal(w, source * 0.1 if outputs and not trained else source), (i, name)
    assert not torch.allclose(_logits(scaled, inputs), _logits(exact, inputs))
    zero, want = grow_decoder(model, 6, "spread_next", 0.0).state_dict(), exact.state_dict()
    assert zero.keys() == want.keys() and all(torch.equal(zero[k], v) for k, v in want.items())
    with pytest.raises(ValueError, match=r"copy_output_scale must be in \[0, 1\], got 1.5"):
        grow_decoder(model, 6, "spread", 1.5)
    export(model, data_v3.build_processor(), tmp_path / "src", dtype=torch.float32)
    args = ["testbed", "grow", str(tmp_path / "src"), "--layers", "4", "--placement", "spread_next"]
    assert main([*args, "--copy-output-scale", "0.1", "--out", str(tmp_path / "g")]) == 0
    grown, _ = resolve_model(tmp_path / "g")
    assert torch.equal(_logits(grown, inputs), _logits(grow_decoder(model, 4, "spread_next", 0.1), inputs))
    assert main([*args, "--copy-output-scale", "-1", "--out", str(tmp_path / "h")]) == 2
    assert not (tmp_path / "h").exists()


def test_new_layers_receive_gradients_and_move():
    model = _model(1)
    grown = grow_decoder(model, 3, "spread").train()
    inputs = _inputs(grown)
    labels = inputs["input_ids"].clone()
    loss = grown(**inputs, labels=labels).loss
    loss.backward()
    new = grown.model.language_model.layers[1]
    assert new.self_attn.o_proj.weight.grad.abs().sum() > 0 and new.mlp.down_proj.weight.grad.abs().sum() > 0


def test_grow_cli_writes_a_loadable_deeper_checkpoint_atomically(tmp_path):
    from vtprune.cli import main
    from vtprune.testbed.builtin import resolve_model
    from vtprune.testbed.train import export

    model = _model(2)
    export(model, data_v3.build_processor(), tmp_path / "src", dtype=torch.float32)
    assert main(["testbed", "grow", str(tmp_path / "src"), "--layers", "5", "--out", str(tmp_path / "deep")]) == 0
    deep, _ = resolve_model(tmp_path / "deep")
    assert deep.config.text_config.num_hidden_layers == 5
    inputs = _inputs(model)
    assert torch.equal(_logits(deep, inputs), _logits(model, inputs))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "src"]  # no temporary directory left behind
    # bad requests: one-line errors, nothing written
    assert main(["testbed", "grow", str(tmp_path / "src"), "--layers", "1", "--out", str(tmp_path / "x")]) == 2
    assert main(["testbed", "grow", str(tmp_path / "src"), "--layers", "4", "--out", str(tmp_path / "deep")]) == 2
    assert main(["testbed", "grow", "tiny:llava", "--layers", "4", "--out", str(tmp_path / "y")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "src"]


def test_spread_next_copies_attend_as_the_next_trained_layer():
    """Between two trained layers every copy sees the next trained layer's input, so with "spread_next" its
    attention is that layer's exactly; with "spread" (copies of the previous layer) it is not."""
    model = _model(2)
    inputs = _inputs(model)

    def attentions(placement: str) -> tuple[torch.Tensor, ...]:
        grown = grow_decoder(model, 6, placement)  # trained layers at 0 and 3
        grown.set_attn_implementation("eager")
        with torch.no_grad():
            return grown(**inputs, output_attentions=True).attentions

    nxt, prev = attentions("spread_next"), attentions("spread")
    assert torch.allclose(nxt[1], nxt[3]) and torch.allclose(nxt[2], nxt[3])
    assert torch.allclose(nxt[3], prev[3]) and torch.allclose(nxt[0], prev[0])  # the trained layers agree
    assert not torch.allclose(prev[1], prev[3], atol=1e-3)
