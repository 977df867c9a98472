"""The training-only answer-position read-out (`answer_readout.py`): the objects a question depends on, their
targets in packed batches, the answer positions they attach to, and a trainer run that uses it and resumes."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from factories import tiny_v3_train_config, train_restoring_threads

from scripts import benchmark_script
from vtprune.testbed import data_v3, questions_v3
from vtprune.testbed.answer_readout import AnswerReadout, answer_positions
from vtprune.testbed.data import Packing
from vtprune.testbed.questions import Question
from vtprune.testbed.scenes import IMAGE_SIZE
from vtprune.testbed.splits import train_split

TYPES = ("colour", "shape", "exist", "count", "relation", "leftof", "number", "side", "upper")


@pytest.fixture(scope="module")
def scenes():
    return [train_split(5).scene(i) for i in range(40)]


def test_fetched_objects_are_the_named_ones_and_the_left_neighbour(scenes):
    seen = set()
    for s in scenes:
        names = {name: i for i, name in questions_v3.references(s)}
        for t in TYPES:
            for q in questions_v3.candidates(s, t):
                first, second = questions_v3.fetched_objects(s, q)
                if t in ("exist", "count", "number"):
                    assert (first, second) == (None, None)
                    continue
                assert q.text.count(s.objects[first].shape) + q.text.count(s.objects[first].colour) >= 1
                assert first in names.values()
                if t == "relation":
                    oa, ob = s.objects[first], s.objects[second]
                    left = " left of " in q.text
                    assert (q.answer == "yes") == ((oa.cx < ob.cx) if left else (oa.cy < ob.cy))
                elif t == "leftof":
                    assert s.objects[second].colour == q.answer and s.objects[second].cx < s.objects[first].cx
                else:
                    assert second is None
                    if t == "colour":
                        assert s.objects[first].colour == q.answer
                    if t == "side":
                        assert (q.answer == "yes") == (s.objects[first].cx < IMAGE_SIZE / 2)
                seen.add(t)
    assert seen == {"colour", "shape", "relation", "leftof", "side", "upper"}
    with pytest.raises(ValueError, match="not a colour question"):
        questions_v3.fetched_objects(scenes[0], Question("colour", "how many red objects are there ?", "2"))


def test_fetch_targets_follow_the_asked_questions_in_order(scenes):
    s = next(x for x in scenes if questions_v3.candidates(x, "leftof"))
    leftof = questions_v3.candidates(s, "leftof")[0]
    count = questions_v3.candidates(s, "count")[0]
    out = data_v3.fetch_targets(s, [count, leftof], slots=3)
    assert out.shape == (3, 4) and np.isnan(out[0]).all() and np.isnan(out[2]).all()
    a, b = questions_v3.fetched_objects(s, leftof)
    want = [s.objects[a].cx, s.objects[a].cy, s.objects[b].cx, s.objects[b].cy]
    np.testing.assert_allclose(out[1], [2 * v / IMAGE_SIZE - 1 for v in want], rtol=1e-6)
    batch = data_v3.question_batch(train_split(5), 0, 3, Packing(4), with_pixels=False, types=TYPES)
    assert batch["fetch"].shape == (3, 4, 4)
    assert torch.isfinite(batch["fetch"]).any() and batch["fetch"][torch.isfinite(batch["fetch"])].abs().max() <= 1


def test_answer_positions_index_each_rows_answers_in_order():
    batch = data_v3.question_batch(train_split(5), 0, 3, Packing(4), with_pixels=False, types=TYPES)
    eos = data_v3.vocabulary()["</s>"]
    rows, pos, slot = answer_positions(batch["labels"], eos, 4)
    labels = batch["labels"]
    for r, p, k in zip(rows.tolist(), pos.tolist(), slot.tolist(), strict=True):
        nxt = int(labels[r, p + 1])
        assert nxt not in (-100, eos)  # the next token is an answer, the k-th of its row
        answers = [t for t in labels[r].tolist() if t not in (-100, eos)]
        assert answers[k] == nxt
    assert len(rows) == int(((labels != -100) & (labels != eos)).sum())
    assert answer_positions(batch["labels"], eos, 2)[2].max() == 1  # slots past the targets are dropped


def test_readout_loss_uses_only_defined_targets_and_can_reach_zero():
    torch.manual_seed(0)
    head = AnswerReadout(8, first_layer=1)
    labels = torch.full((2, 6), -100)
    labels[0, 2], labels[0, 3], labels[1, 4], labels[1, 5] = 7, 2, 9, 2  # one answer (+ eos) per row
    hidden = tuple(torch.randn(2, 6, 8) for _ in range(3))
    fetch = torch.full((2, 1, 4), float("nan"))
    fetch[0, 0] = torch.tensor([0.5, -0.5, 0.1, 0.2])  # row 1's question has no object: adds nothing
    loss, cells, targets, second_cells = head.loss(hidden, labels, fetch, eos_id=2)
    assert targets == 6  # 2 + 4 defined coordinates of row 0's one question
    early = head.named(hidden[1][0, 1])
    late = head.both(hidden[2][0, 1])
    want = (torch.cat([early - fetch[0, 0, :2], late - fetch[0, 0]]) ** 2).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert cells == pytest.approx((early - fetch[0, 0, :2]).abs().mean().item() * 12, rel=1e-5)
    assert math.isnan(second_cells)  # this read-out has no early map of the second object
    none = torch.full((2, 1, 4), float("nan"))
    zero, nan, no_targets, _ = head.loss(hidden, labels, none, eos_id=2)
    assert zero.item() == 0.0 and math.isnan(nan) and no_targets == 0


def test_second_named_objects_are_read_early_only_where_the_question_names_them(scenes):
    torch.manual_seed(0)
    head = AnswerReadout(8, first_layer=1, second=True)
    labels = torch.full((2, 8), -100)
    labels[0, 2], labels[0, 3], labels[0, 5], labels[0, 6] = 7, 2, 8, 2  # row 0: two questions
    labels[1, 4], labels[1, 5] = 9, 2  # row 1: one
    hidden = tuple(torch.randn(2, 8, 8) for _ in range(3))
    fetch = torch.tensor([[[0.5, -0.5, 0.1, 0.2], [0.3, 0.3, -0.2, 0.6]],
                          [[0.1, 0.2, -0.7, 0.4], [float("nan")] * 4]])  # fmt: skip
    named2 = torch.tensor([[True, False], [False, False]])  # only row 0's first question names its second object
    loss, _, targets, second_cells = head.loss(hidden, labels, fetch, 2, named2)
    assert targets == 3 * 6 + 2  # every question's 6 targets, plus row 0 question 0's second object early
    early2 = head.second(hidden[1][0, 1])
    assert second_cells == pytest.approx((early2 - fetch[0, 0, 2:]).abs().mean().item() * 12, rel=1e-5)
    preds = [torch.cat([head.named(hidden[1][r, p]), head.both(hidden[2][r, p])]) for r, p in ((0, 1), (0, 4), (1, 3))]
    goals = [torch.cat([fetch[r, k, :2], fetch[r, k]]) for r, k in ((0, 0), (0, 1), (1, 0))]
    sq = torch.cat([(a - b) ** 2 for a, b in zip(preds, goals, strict=True)] + [(early2 - fetch[0, 0, 2:]) ** 2])
    assert loss.item() == pytest.approx(sq.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="give second_named"):
        head.loss(hidden, labels, fetch, 2)
    # in real batches, exactly the relation questions name their second object
    batch = data_v3.question_batch(train_split(5), 0, 6, Packing(4), with_pixels=False, types=TYPES)
    assert batch["second_named"].shape == (6, 4) and batch["second_named"].dtype == torch.bool
    s = next(x for x in scenes if questions_v3.candidates(x, "relation") and questions_v3.candidates(x, "leftof"))
    assert questions_v3.names_second(questions_v3.candidates(s, "relation")[0])
    assert not questions_v3.names_second(questions_v3.candidates(s, "leftof")[0])
    assert batch["second_named"].any()
    assert torch.isfinite(batch["fetch"][..., 2][batch["second_named"]]).all()  # a named second object has a place


def test_trainer_with_the_readout_trains_it_and_resumes(tmp_path):
    from vtprune import checkpointing as cpt
    from vtprune.testbed.train import train

    cfg = tiny_v3_train_config(steps_b=2, eval_every=10, save_every=1, fetch_weight=1.0, fetch_layer=1,
                               fetch_second=True)
    logs: list[str] = []
    train_restoring_threads(tmp_path, cfg, logs.append)
    state = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")
    first = {k: v.clone() for k, v in state["readout"].items()}
    train_restoring_threads(tmp_path, replace(cfg, steps_b=3), logs.append)
    state = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")
    assert any(not torch.equal(first[k], state["readout"][k]) for k in first)  # the resumed run kept training it
    assert int(state["opt_readout"]["state"][0]["step"]) == 3  # its optimiser resumed too (fresh: 1)
    assert int(state["st"]["step"]) == 3
    assert "second.weight" in state["readout"]  # fetch_second's map is trained and saved with the rest
    with pytest.raises(ValueError, match="fetch_layer 9 is not a decoder layer"):
        train(tmp_path / "bad", replace(cfg, fetch_layer=9), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="fetch_second .* needs fetch_weight > 0"):
        train(tmp_path / "bad2", replace(cfg, fetch_weight=0.0), progress=False, log=lambda _: None)


def test_attention_mass_of_uniform_attention_is_the_objects_share_of_the_patches():
    """benchmarks/v3_attention_mass.py: with every query projection zeroed, each position attends evenly to all
    earlier tokens, so the share of the image attention on an object is its patch count / 576 and the share of
    all attention on the image is 576 / (prompt length)."""

    from vtprune.testbed.data_v3 import balanced_samples, build_model, build_processor
    from vtprune.testbed.scenes_v3 import id_map, patch_coverage
    from vtprune.testbed.splits import calibration_split
    from vtprune.testbed.tokenizer import prompt
    from vtprune.testbed.train_v3 import TINY_V3

    module = benchmark_script("v3_attention_mass")
    model, processor = build_model(TINY_V3, seed=0).eval(), build_processor()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.zero_()
    model.set_attn_implementation("eager")
    samples = balanced_samples(calibration_split(20001), 2, types=("relation", "leftof"))
    out = module.attention_mass(model, processor, samples)
    assert set(out) == {("relation", "A"), ("relation", "B"), ("leftof", "A"), ("leftof", "B")}
    s = next(x for x in samples if x["type"] == "leftof")
    a, b = questions_v3.fetched_objects(s["scene"], Question(s["type"], s["question"], s["answer"]))
    patches = (patch_coverage(id_map(s["scene"]))[:, [a + 1, b + 1]] > 0).sum(0)
    length = processor(images=[s["image"]], text=[prompt(s["question"])], return_tensors="pt")["input_ids"].shape[1]
    first = 0  # s is the first leftof question, and every leftof question has both objects
    np.testing.assert_allclose(out[("leftof", "A")][first, ..., 0], patches[0] / 576, rtol=1e-4)
    np.testing.assert_allclose(out[("leftof", "B")][first, ..., 0], patches[1] / 576, rtol=1e-4)
    np.testing.assert_allclose(out[("leftof", "A")][first, ..., 1], 576 / length, rtol=1e-4)


def test_number_questions_fetch_the_centres_of_their_two_digits(scenes):
    from vtprune.testbed.scenes_v3 import _number_rects, digit_centres

    s = scenes[0]
    number = questions_v3.candidates(s, "number")[0]
    out = data_v3.fetch_targets(s, [number], slots=1)[0]
    for pos, (cx, cy) in enumerate(digit_centres(s)):
        half_w, half_h = 0.55 * s.digit_height / 2 + 1e-6, s.digit_height / 2 + 1e-6  # the digit's cell
        for x0, y0, x1, y1 in (r for p, r in _number_rects(s) if p == pos):  # its drawn segments lie in the cell
            assert cx - half_w <= x0 <= x1 <= cx + half_w and cy - half_h <= y0 <= y1 <= cy + half_h
        np.testing.assert_allclose(out[2 * pos: 2 * pos + 2], [2 * cx / IMAGE_SIZE - 1, 2 * cy / IMAGE_SIZE - 1],
                                   rtol=1e-6)
    assert out[0] < out[2]  # tens left of units
