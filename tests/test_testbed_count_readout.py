"""The training-only count read-outs (`count_readout.py`): per-patch object shares whose sums are the counts, the
count targets of packed batches, the loss against a hand-computed reference, and a trainer run that uses them and
resumes."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from factories import tiny_v3_train_config, train_restoring_threads

from vtprune.testbed import data_v3, questions_v3
from vtprune.testbed.count_readout import CountReadout
from vtprune.testbed.data import Packing
from vtprune.testbed.questions import Question
from vtprune.testbed.scenes import COLOURS, SHAPES
from vtprune.testbed.scenes_v3 import id_map, object_share
from vtprune.testbed.splits import train_split

TYPES = ("colour", "shape", "exist", "count", "relation", "leftof", "number", "side", "upper")


@pytest.fixture(scope="module")
def scenes():
    return [train_split(5).scene(i) for i in range(30)]


def test_object_shares_sum_to_every_count_question_answer(scenes):
    asked = 0
    for s in scenes:
        share = object_share(s)
        assert share.shape == (576, len(COLOURS) + len(SHAPES)) and (share >= 0).all()
        visible = set(np.unique(id_map(s)).tolist())
        colours = Counter(o.colour for i, o in enumerate(s.objects) if i + 1 in visible)
        shapes = Counter(o.shape for i, o in enumerate(s.objects) if i + 1 in visible)
        want = [colours[c] for c in COLOURS] + [shapes[k] for k in SHAPES]
        np.testing.assert_allclose(share.sum(0), want, atol=1e-4)
        for q in questions_v3.candidates(s, "count"):  # the question's own answer, through its noun
            column = next(i for i, name in enumerate([*COLOURS, *SHAPES]) if f" {name}" in f" {q.text}")
            assert share[:, column].sum() == pytest.approx(float(q.answer), abs=1e-4)
            asked += 1
    assert asked > 20


def test_count_targets_mark_only_count_questions():
    qs = [Question("colour", "what colour is the circle ?", "red"), Question("count", "how many circles are there ?",
                                                                            "3")]
    out = data_v3.count_targets(qs, slots=3)
    assert np.isnan(out[0]) and out[1] == 3.0 and np.isnan(out[2])
    assert "share" not in data_v3.question_batch(train_split(5), 0, 1, Packing(4), with_pixels=False, types=TYPES)
    batch = data_v3.question_batch(train_split(5), 0, 3, Packing(4), with_pixels=False, types=TYPES, with_counts=True)
    assert batch["count"].shape == (3, 4) and batch["share"].shape == (3, 576, len(COLOURS) + len(SHAPES))
    for r in range(3):
        np.testing.assert_allclose(batch["share"][r].numpy(), object_share(train_split(5).scene(r)))


def test_count_readout_loss_matches_a_hand_computed_reference():
    torch.manual_seed(0)
    head = CountReadout(8, channels=3, layer=1)
    image_id = 5
    ids = torch.tensor([[1, 5, 5, 5, 7, 7], [1, 5, 5, 5, 7, 7]])  # 3 image tokens per row
    labels = torch.full((2, 6), -100)
    labels[0, 5], labels[1, 5] = 9, 9  # position 4 predicts row's one answer
    hidden = tuple(torch.randn(2, 6, 8) for _ in range(3))
    patch_index = torch.tensor([[0, 2, 3], [1, 2, 3]])  # rows keep different patches of 4
    share = torch.zeros(2, 4, 3)
    share[0, 2, 1], share[0, 3, 1], share[1, 1, 0] = 0.5, 0.5, 1.0
    count = torch.tensor([[4.0], [float("nan")]])  # only row 0's question is a count
    share_loss, count_loss, implied, n = head.loss(hidden, ids, image_id, patch_index, labels, share, count, eos_id=2)
    pred = head.share(hidden[1][:, 1:4])  # [2, 3, 3]
    goal = torch.stack([share[0, [0, 2, 3]], share[1, [1, 2, 3]]])
    err = (pred - goal).square().sum(-1)
    shows = goal.sum(-1) > 0
    assert share_loss.item() == pytest.approx((err[shows].mean() + err[~shows].mean()).item(), rel=1e-5)
    assert implied == pytest.approx((pred.sum(1) - goal.sum(1)).abs().mean().item(), rel=1e-5)
    said = head.count(hidden[2][0, 4])
    assert n == 1 and count_loss.item() == pytest.approx((((said - 4.0) / 9) ** 2).item(), rel=1e-5)
    _, none, _, zero = head.loss(hidden, ids, image_id, patch_index, labels, share, torch.full((2, 1), float("nan")),
                                 eos_id=2)
    assert none.item() == 0.0 and zero == 0


def test_trainer_with_the_count_readout_trains_it_and_resumes(tmp_path):
    from vtprune import checkpointing as cpt
    from vtprune.testbed.train import train

    cfg = tiny_v3_train_config(steps_b=2, eval_every=10, save_every=1, fetch_weight=0.0, count_weight=1.0)
    train_restoring_threads(tmp_path, cfg)
    state = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")
    first = {k: v.clone() for k, v in state["counter"].items()}
    train_restoring_threads(tmp_path, replace(cfg, steps_b=3))
    state = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")
    assert any(not torch.equal(first[k], state["counter"][k]) for k in first)  # the resumed run kept training it
    assert int(state["opt_counter"]["state"][0]["step"]) == 3  # its optimiser resumed too (fresh: 1)
    with pytest.raises(ValueError, match="count_weight > 0 needs shapes-v3 data"):
        train(tmp_path / "v2", replace(cfg, data="shapes-v2"), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="count_layer 9 is not a decoder layer"):
        train(tmp_path / "bad", replace(cfg, count_layer=9), progress=False, log=lambda _: None)
