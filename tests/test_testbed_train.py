"""End-to-end training smoke test on a tiny model: both stages, export, resume, reload."""

from __future__ import annotations

import json

import pytest
import torch

from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.data import balanced_samples
from vtprune.testbed.evaluate import evaluate
from vtprune.testbed.model import TINY
from vtprune.testbed.train import TrainConfig, train


def _config(steps_b: int) -> TrainConfig:
    return TrainConfig(size=TINY, steps_a=2, batch_a=2, steps_b=steps_b, batch_b=2, questions_per_image=3,
                       warmup=1, eval_every=2, eval_per_type=1, save_every=1, keep_schedule="1:8,3:16",
                       probe_scenes=4, token_xy_weight=1.0, cls_steps=2)


def test_tiny_training_runs_exports_and_resumes(tmp_path):
    threads = torch.get_num_threads()
    try:
        train(tmp_path, _config(2), progress=False, log=lambda _: None)
        summary = json.loads((tmp_path / "train_summary.json").read_text())
        stages = [h["stage"] for h in summary["history"]]
        assert "A" in stages and "B-eval" in stages
        train(tmp_path, _config(4), progress=False, log=lambda _: None)  # resumes Stage B from step 2
        summary = json.loads((tmp_path / "train_summary.json").read_text())
        assert [h["step"] for h in summary["history"] if h["stage"] == "B-eval"] == [2, 4]
        stage_c = [h for h in summary["history"] if h["stage"] == "C"]  # after each finished Stage B
        assert len(stage_c) == 2 and all(set(h["after"]) >= {"mass", "precision"} for h in stage_c)
        from vtprune import checkpointing as cpt

        state = cpt.load_state(cpt.latest(tmp_path / "state", "-"), "state")  # safetensors + JSON, no pickle
        assert set(state["token_xy"]) == {"xy.weight", "xy.bias"}  # the training-only head resumes too
        assert not any("token_xy" in k or k.startswith("xy.") for k in state["model"])
    finally:
        torch.set_num_threads(threads)
    config = json.loads((tmp_path / "model" / "config.json").read_text())  # re-exported by Stage C
    assert {c.get("dtype", "float16") for c in (config, config["text_config"], config["vision_config"])} == {"float16"}
    assert json.loads((tmp_path / "model" / "tokenizer.json").read_text())["padding"] is None
    model, processor = resolve_model(tmp_path / "model")
    assert next(model.parameters()).dtype == torch.float32
    res = evaluate(model, processor, balanced_samples(seed=3, n_per_type=1), batch_size=6)
    assert res["n"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    assert {r["prediction"] for r in res["records"]} <= set(processor.tokenizer.get_vocab())


def test_init_from_a_whole_checkpoint_only_adds_the_column_code(tmp_path):
    """`init` starts Stage B from every weight of a checkpoint; with a column code it rewrites only projector
    rows 25..47 (and silences them in linear_2), and init + vision_init together are refused."""
    from dataclasses import replace

    size = replace(TINY, text_width=64, text_heads=2, text_mlp=128)
    threads = torch.get_num_threads()
    try:
        train(tmp_path / "a", replace(_config(2), size=size), progress=False, log=lambda _: None)
        cfg = replace(_config(0), size=size, steps_a=0, init=str(tmp_path / "a" / "model"), column_code_scale=6.0)
        model = train(tmp_path / "b", cfg, progress=False, log=lambda _: None)
        with pytest.raises(ValueError, match="either init"):
            train(tmp_path / "c", replace(cfg, vision_init=cfg.init), progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    src, _ = resolve_model(tmp_path / "a" / "model")
    new, old = model.state_dict(), src.state_dict()
    changed = {k for k in old if not torch.equal(new[k], old[k].float())}
    proj = "model.multi_modal_projector."
    assert changed == {proj + "linear_1.weight", proj + "linear_1.bias", proj + "linear_2.weight"}
    w1_new, w1_old = new[proj + "linear_1.weight"], old[proj + "linear_1.weight"].float()
    assert torch.equal(w1_new[:25], w1_old[:25]) and torch.equal(w1_new[48:], w1_old[48:])
    assert not torch.equal(w1_new[25:48], w1_old[25:48])
    w2_new, w2_old = new[proj + "linear_2.weight"], old[proj + "linear_2.weight"].float()
    assert (w2_new[:, 25:48] == 0).all() and torch.equal(w2_new[:, 48:], w2_old[:, 48:])


def test_question_type_schedule_with_training_only_types():
    from vtprune.testbed.questions import QUESTION_TYPES
    from vtprune.testbed.train import types_at

    assert types_at("400:colour,800:colour+side", 0, "side") == ("colour",)
    assert types_at("400:colour,800:colour+side", 500, "side") == ("colour", "side")
    assert types_at("400:colour", 400, "side") == QUESTION_TYPES + ("side",)
    assert types_at("", 0, "") == QUESTION_TYPES
    with pytest.raises(ValueError, match="unknown question types"):
        types_at("400:colour+size", 0)
    with pytest.raises(ValueError, match="unknown question types"):
        types_at("", 0, "shade")


def test_a_type_listed_twice_is_asked_about_twice_as_often():
    import collections

    import numpy as np

    from vtprune.testbed.questions import sample_questions
    from vtprune.testbed.scenes import make_scene
    from vtprune.testbed.train import types_at

    types = types_at("100:count+count+colour", 0)
    assert types == ("count", "count", "colour")
    asked = collections.Counter()
    for i in range(60):
        rng = np.random.default_rng(i)
        asked.update(q.type for q in sample_questions(make_scene(0, i), rng, types))
    # one question per listed type and scene (a counting question always exists; a colour one not always)
    assert asked["count"] == 2 * 60 and 40 < asked["colour"] <= 60


def test_visual_token_curriculum_helpers():
    from vtprune.testbed.data import Packing, question_batch
    from vtprune.testbed.features import vision_features
    from vtprune.testbed.model import build_model
    from vtprune.testbed.train import keep_at, lm_loss, shorten

    assert [keep_at("5:8,9:32", s) for s in (0, 4, 5, 8, 9, 100)] == [8, 8, 32, 32, None, None]
    assert keep_at("", 0) is None
    model = build_model(TINY).eval()
    batch = question_batch(0, 0, 2, Packing(3))
    with torch.no_grad():
        feats = vision_features(model, batch["pixel_values"])
        full = lm_loss(model, feats, batch["input_ids"], batch["labels"], batch["attention_mask"])[0]
        text, same = shorten(batch, feats, 576, torch.Generator().manual_seed(0))
        assert torch.allclose(lm_loss(model, same, **text)[0], full, atol=1e-5)
        text, short = shorten(batch, feats, 16, torch.Generator().manual_seed(0))
    assert short.shape[1] == 16 and text["input_ids"].shape[1] == batch["input_ids"].shape[1] - 560
    kept = text["position_ids"][:, 3:19] - 3  # original visual-token indices, ascending
    assert bool((kept.diff(dim=1) > 0).all())
    for i in range(2):
        assert set(batch["informative"][i].nonzero().flatten().tolist()) <= set(kept[i].tolist())


def test_probe_projector_init_writes_readouts_into_first_rows():
    """projector_init="probe": rows 0..24 of linear_1 become colour/shape/digit/xy read-outs, the rest stay."""
    from vtprune.testbed.model import build_model
    from vtprune.testbed.train import probe_projector, standardize_projector

    model = build_model(TINY).eval()
    standardize_projector(model, 2, "cpu", n=2)
    lin = model.model.multi_modal_projector.linear_1
    before = lin.weight.detach().clone()
    stats = probe_projector(model, 0, "cpu", n=4, background=4, iters=20)
    assert set(stats) == {"colour", "shape", "digit", "xy_mae_cells"}
    assert all(0.0 <= stats[k] <= 1.0 for k in ("colour", "shape", "digit")) and stats["xy_mae_cells"] >= 0
    assert not torch.equal(lin.weight[:25], before[:25])
    assert torch.equal(lin.weight[25:], before[25:])


def test_probe_projector_column_code_rows_scale_and_fit():
    """column_code_scale > 0 adds 23 column-thermometer rows (25..47) proportional to the scale; the first 25
    rows and the rest are as without it; a projector narrower than 48 rows is refused by name."""
    from dataclasses import replace

    from vtprune.testbed.model import build_model
    from vtprune.testbed.train import probe_projector, standardize_projector

    def probed(scale: float, width: int = 64):
        torch.manual_seed(0)
        model = build_model(replace(TINY, text_width=width)).eval()
        standardize_projector(model, 2, "cpu", n=2)
        before = model.model.multi_modal_projector.linear_1.weight.detach().clone()
        torch.manual_seed(1)
        stats = probe_projector(model, 0, "cpu", n=4, background=4, iters=20, column_code_scale=scale)
        return model.model.multi_modal_projector.linear_1, before, stats

    plain, before, _ = probed(0.0)
    one, _, stats = probed(1.0)
    three, _, _ = probed(3.0)
    assert 0.5 < stats["column_bits_acc"] <= 1.0  # the thresholds are read from the patch features
    # the same rows up to float reductions, whose order varies with the BLAS thread count (a full-suite run once
    # differed by 1.1e-5 at 0.34); a change of what the first rows hold moves them by ~0.1
    assert torch.allclose(one.weight[:25], plain.weight[:25], rtol=1e-4, atol=1e-4)
    assert torch.allclose(one.bias[:25], plain.bias[:25], rtol=1e-4, atol=1e-4)
    assert torch.allclose(three.weight[25:48], 3 * one.weight[25:48], rtol=1e-4, atol=1e-4)
    assert not torch.equal(one.weight[25:48], before[25:48])
    assert torch.equal(one.weight[48:], before[48:])
    with pytest.raises(ValueError, match="projector too narrow"):
        probed(1.0, width=32)


def test_probe_projector_row_code_fills_the_rows_after_the_column_block():
    """row_code_scale > 0 writes a row thermometer into rows 48.. (as many as the projector has, <= 23); on a
    trained projector (column_code_only) only those rows change and linear_2 ignores them, so the model's output
    is unchanged; with no room after the column block it is refused by name."""
    from dataclasses import replace

    from vtprune.testbed.model import build_model
    from vtprune.testbed.train import probe_projector, standardize_projector

    torch.manual_seed(0)
    model = build_model(replace(TINY, text_width=64)).eval()
    standardize_projector(model, 2, "cpu", n=2)
    proj = model.model.multi_modal_projector
    feats = torch.randn(2, 5, proj.linear_1.in_features)
    out_before = proj(feats)
    w1, b1, w2 = (t.detach().clone() for t in (proj.linear_1.weight, proj.linear_1.bias, proj.linear_2.weight))
    stats = probe_projector(model, 0, "cpu", n=4, background=4, iters=20, column_code_only=True, row_code_scale=6.0)
    assert 0.5 < stats["row_bits_acc"] <= 1.0 and "column_bits_acc" not in stats
    assert torch.equal(proj.linear_1.weight[:48], w1[:48]) and torch.equal(proj.linear_1.bias[:48], b1[:48])
    assert not torch.equal(proj.linear_1.weight[48:], w1[48:])  # 16 row-code rows
    assert (proj.linear_2.weight[:, 48:] == 0).all() and torch.equal(proj.linear_2.weight[:, :48], w2[:, :48])
    mask = torch.zeros_like(w2, dtype=torch.bool)
    mask[:, 48:] = True
    assert torch.allclose(proj(feats), out_before - torch.nn.functional.linear(
        proj.act(torch.nn.functional.linear(feats, w1, b1)), w2 * mask), atol=1e-5)  # old row-code units removed
    with pytest.raises(ValueError, match="too narrow for a row code"):
        narrow = build_model(replace(TINY, text_width=48)).eval()
        probe_projector(narrow, 0, "cpu", n=4, background=4, iters=20, row_code_scale=1.0, column_code_scale=1.0)


def test_feature_cache_and_question_salt(tmp_path):
    """Stage B's feature cache equals the live vision forward; salt draws other questions on the same scenes."""
    from vtprune.testbed.data import Packing, question_batch
    from vtprune.testbed.features import vision_features
    from vtprune.testbed.model import build_model
    from vtprune.testbed.train import feature_cache

    model = build_model(TINY).eval()
    cache = feature_cache(model, 1, 3, "cpu", tmp_path / "f.pt", log=lambda _: None)
    assert cache.shape == (3, 576, TINY.vision_width) and cache.dtype == torch.float16
    assert torch.equal(feature_cache(model, 1, 3, "cpu", tmp_path / "f.pt", log=print), cache)  # reloaded
    # a cache written by another tower is recomputed, never reused (its metadata carries the tower's fingerprint)
    other = build_model(TINY, seed=1).eval()
    recomputed = feature_cache(other, 1, 3, "cpu", tmp_path / "f.pt", log=lambda _: None)
    assert not torch.equal(recomputed, cache)
    assert torch.equal(feature_cache(other, 1, 3, "cpu", tmp_path / "f.pt", log=print), recomputed)
    live = question_batch(1, 0, 3, Packing(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = vision_features(model, live["pixel_values"]).float()
    assert torch.allclose(cache.float(), feats, atol=2e-2)
    same = question_batch(1, 0, 0, Packing(3), indices=[0, 1, 2], with_pixels=False)
    assert "pixel_values" not in same
    assert all(torch.equal(same[k], live[k]) for k in ("input_ids", "labels", "attention_mask", "informative"))
    salted = [question_batch(1, 0, 0, Packing(3), indices=[0, 1, 2], salt=s, with_pixels=False) for s in (1, 2)]
    assert any(not torch.equal(b["input_ids"], live["input_ids"]) for b in salted)


def test_dense_heads_weigh_object_patches_in_the_xy_loss():
    """Stage A's xy regression counts an object patch `xy_object_weight` times a background patch, and
    reports the object patches' position error in cells."""
    from vtprune.testbed.train import DenseHeads

    torch.manual_seed(0)
    heads = DenseHeads(8)
    feats = torch.randn(1, 576, 8)
    target = {k: torch.zeros(1, 576, dtype=torch.long) for k in ("colour", "shape", "digit")}
    target["colour"][0, 5] = 2  # one object patch
    with torch.no_grad():
        pred = heads.xy(feats.float())
    target["xy"] = pred.clone()
    target["xy"][0, 5] += torch.tensor([3.0 / 23, 4.0 / 23])  # 5 cells off on the object patch only
    _, stats = heads.loss(feats, target, xy_object_weight=20.0)
    assert abs(stats["xy_obj_cells"] - 5.0) < 1e-3
    off_obj = heads.loss(feats, target, xy_object_weight=20.0)[0]
    uniform = heads.loss(feats, target, xy_object_weight=1.0)[0]
    target_bg = dict(target, xy=pred.clone())
    target_bg["xy"][0, 6] += torch.tensor([3.0 / 23, 4.0 / 23])  # the same error on a background patch
    off_bg = heads.loss(feats, target_bg, xy_object_weight=20.0)[0]
    assert off_obj > uniform and off_obj > off_bg


def test_token_xy_head_reads_the_cell_of_informative_tokens_only():
    """Stage B's training-only (x, y) read-out: zero loss when the head is exact, background tokens ignored."""
    from vtprune.testbed.train import TokenXYHead

    head = TokenXYHead(4)
    with torch.no_grad():
        head.xy.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        head.xy.bias.zero_()
    patch_index = torch.tensor([[0, 25, 575]])  # cells (0, 0), (1, 1), (23, 23)
    exact = torch.zeros(1, 3, 4)
    exact[0, :, :2] = torch.stack([patch_index[0] % 24, patch_index[0] // 24], -1).float() / 23
    informative = torch.tensor([[True, True, False]])
    assert head.loss(exact, patch_index, informative).item() < 1e-10
    wrong_background = exact.clone()
    wrong_background[0, 2, :2] = 0.0
    assert head.loss(wrong_background, patch_index, informative).item() < 1e-10
    wrong_object = exact.clone()
    wrong_object[0, 1, 0] += 0.5
    assert abs(head.loss(wrong_object, patch_index, informative).item() - 0.125) < 1e-6


def test_lm_loss_accuracy_counts_answers_not_their_eos():
    """The logged training accuracy is the answers' (teacher-forced argmax at each answer position, as the full
    model's forward gives it), not lifted by the trivially predicted eos after every answer."""
    from vtprune.testbed.data import Packing, question_batch
    from vtprune.testbed.features import vision_features
    from vtprune.testbed.model import build_model
    from vtprune.testbed.train import lm_loss

    model = build_model(TINY, seed=1).eval()
    with torch.no_grad():  # random weights, so the argmax varies between positions
        for p in model.model.language_model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    batch = question_batch(0, 0, 4, Packing(3))
    eos = model.config.text_config.eos_token_id
    with torch.no_grad():
        feats = vision_features(model, batch["pixel_values"])
        _, acc = lm_loss(model, feats, batch["input_ids"], batch["labels"], batch["attention_mask"])
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    pred = logits[:, :-1].argmax(-1)
    answer = (target != -100) & (target != eos)
    assert int(answer.sum()) == 4 * 3  # one answer token per question
    assert acc == pytest.approx(float((pred[answer] == target[answer]).float().mean()))
    # a model that always says eos gets every eos right and no answer: 0, where a token accuracy would say 0.5
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: out + 100 * torch.nn.functional.one_hot(
        torch.tensor(eos), out.shape[-1]).to(out.dtype))
    try:
        with torch.no_grad():
            assert lm_loss(model, feats, batch["input_ids"], batch["labels"], batch["attention_mask"])[1] == 0.0
    finally:
        hook.remove()
