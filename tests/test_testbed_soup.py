"""Model soups of built-in models: the mean of the weights, exactly; one architecture only; the CLI writes a
loadable model atomically and refuses bad requests with one line, writing nothing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vtprune.testbed import data_v3
from vtprune.testbed.soup import average_models
from vtprune.testbed.train_v3 import TINY_V3


def _model(seed: int, layers: int = 2):
    return data_v3.build_model(replace(TINY_V3, text_layers=layers), seed=seed).eval()


def _logits(model):
    from vtprune.testbed.questions import Question
    from vtprune.testbed.splits import calibration_split

    ids = torch.tensor([data_v3.encode_conversation([Question("colour", "what colour is the circle ?", "red")],
                                                    data_v3.Packing(1))[0]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": data_v3.scene_pixels(calibration_split(), [0])}
    with torch.no_grad():
        return model(**inputs).logits


def test_soup_is_the_mean_of_the_weights_and_leaves_its_inputs_alone():
    a, b, c = _model(1), _model(2), _model(3)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    souped = average_models([a, b, c])
    sa, sb, sc, ss = a.state_dict(), b.state_dict(), c.state_dict(), souped.state_dict()
    assert ss.keys() == sa.keys()
    for k, v in ss.items():
        assert torch.allclose(v, (sa[k] + sb[k] + sc[k]) / 3, atol=1e-7), k
    assert any(not torch.equal(ss[k], sa[k]) for k in ss)  # the oracle can fail: the seeds give other weights
    assert all(torch.equal(v, sa[k]) for k, v in before.items())  # model 0 untouched
    # weights: normalised; all weight on one model reproduces it bit-exactly, outputs included
    only_b = average_models([a, b], weights=[0, 5])
    assert all(torch.equal(v, sb[k]) for k, v in only_b.state_dict().items())
    assert torch.equal(_logits(only_b), _logits(b))
    # a soup of a model with itself is the model
    same = average_models([a, a])
    assert torch.equal(_logits(same), _logits(a))


def test_soup_refuses_other_architectures_and_bad_weights():
    a = _model(1)
    with pytest.raises(ValueError, match="config differs in: text_config"):
        average_models([a, _model(2, layers=3)])
    with pytest.raises(ValueError, match="at least two models, got 1"):
        average_models([a])
    with pytest.raises(ValueError, match="weights must be 2 non-negative numbers"):
        average_models([a, _model(2)], weights=[1.0])
    with pytest.raises(ValueError, match="weights must be 2 non-negative numbers"):
        average_models([a, _model(2)], weights=[1.0, -1.0])
    with pytest.raises(TypeError, match="not a LlavaForConditionalGeneration"):
        average_models([a, torch.nn.Linear(2, 2)])


def test_soup_cli_writes_a_loadable_model_atomically(tmp_path):
    from vtprune.cli import main
    from vtprune.testbed.builtin import resolve_model
    from vtprune.testbed.train import export

    a, b = _model(1), _model(2)
    for name, m in (("a", a), ("b", b)):
        export(m, data_v3.build_processor(), tmp_path / name, dtype=torch.float32)
    args = ["testbed", "soup", str(tmp_path / "a"), str(tmp_path / "b")]
    assert main([*args, "--out", str(tmp_path / "s")]) == 0
    souped, _ = resolve_model(tmp_path / "s")  # from_pretrained of the saved soup
    assert torch.allclose(_logits(souped), _logits(average_models([a, b])), atol=1e-6)
    assert main([*args, "--weights", "1,0", "--out", str(tmp_path / "w")]) == 0
    assert torch.equal(_logits(resolve_model(tmp_path / "w")[0]), _logits(a))
    # bad requests: exit 2, nothing written, no temporary directory left behind
    export(_model(3, layers=3), data_v3.build_processor(), tmp_path / "deep", dtype=torch.float32)
    for bad in ([str(tmp_path / "a"), "--out", str(tmp_path / "x")],  # one model
                [*args[2:], "--out", str(tmp_path / "s")],  # out exists
                [*args[2:], "--weights", "1,x", "--out", str(tmp_path / "x")],
                [*args[2:], "--weights", "1", "--out", str(tmp_path / "x")],
                [str(tmp_path / "a"), str(tmp_path / "deep"), "--out", str(tmp_path / "x")],
                [str(tmp_path / "a"), "tiny:llava", "--out", str(tmp_path / "x")],
                [str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "x")]):
        assert main(["testbed", "soup", *bad]) == 2, bad
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "deep", "s", "w"]


def test_a_soup_is_stored_in_the_first_models_stored_dtype(tmp_path):
    """The models are averaged in float32 and the soup is saved as the first model is stored (float16 here), not in
    the float32 they were loaded in."""
    from safetensors import safe_open

    from vtprune.testbed.soup import soup_saved, stored_dtype
    from vtprune.testbed.train import export

    export(_model(1), data_v3.build_processor(), tmp_path / "a", dtype=torch.float16)
    export(_model(2), data_v3.build_processor(), tmp_path / "b", dtype=torch.float32)
    soup_saved([tmp_path / "a", tmp_path / "b"], tmp_path / "s")
    soup_saved([tmp_path / "b", tmp_path / "a"], tmp_path / "t")
    assert stored_dtype(tmp_path / "s") == torch.float16 and stored_dtype(tmp_path / "t") == torch.float32
    with safe_open(str(tmp_path / "s" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
