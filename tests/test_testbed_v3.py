"""Built-in benchmark v3 (issue 21): scenes, questions, splits, published rankings, data layouts."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from vtprune.errors import VtpruneError
from vtprune.testbed import data_v3, questions_v3, scenes_v3
from vtprune.testbed.data import Packing
from vtprune.testbed.published import (
    average_ranks,
    published_entries,
    published_scores,
    rank_correlation,
    spearman_rho,
)
from vtprune.testbed.splits import (
    Split,
    SplitError,
    calibration_routine,
    calibration_split,
    heldout_splits,
    parse_split,
    require_calibration,
    train_split,
)


@pytest.fixture(scope="module")
def scenes() -> list[scenes_v3.Scene3]:
    return [calibration_split().scene(i) for i in range(40)]


def test_scene_is_deterministic_and_geometry_is_llava(scenes):
    again = calibration_split().scene(3)
    assert again == scenes[3]
    a, b = np.asarray(scenes_v3.render(scenes[3])), np.asarray(scenes_v3.render(again))
    assert a.shape == (336, 336, 3) and (a == b).all()
    assert not (np.asarray(scenes_v3.render(scenes[4])) == a).all()


def test_scene_statistics_are_natural(scenes):
    """Varied sizes (some under one patch, some several patches), off-grid, distractors, multi-patch numbers."""
    sizes = np.asarray([o.size for s in scenes for o in s.objects])
    assert (sizes < scenes_v3.CELL).any() and (sizes > 3 * scenes_v3.CELL).any()
    offsets = np.asarray([o.cx % scenes_v3.CELL for s in scenes for o in s.objects])
    assert offsets.std() > 3.0  # centres are not aligned to the patch grid
    assert all(len(s.distractors) >= 1 for s in scenes)
    stats = scenes_v3.scene_statistics(scenes[:12])
    assert stats["patches_per_number"] >= 2 and stats["patches_per_object"] > 1.5
    assert 0.02 < stats["share_informative_patches"] < 0.4
    counts = Counter(n for s in scenes for n in [len(s.objects)])
    assert max(counts) >= 9


def test_patch_labels_follow_the_pixels(scenes):
    scene = scenes[0]
    ids = scenes_v3.id_map(scene)
    labels = scenes_v3.patch_labels(scene, ids)
    # every object labels at least one patch with its own colour and shape
    for o in scene.objects:
        r, c = int(o.cy // 14), int(o.cx // 14)
        window = (slice(max(0, r - 2), r + 3), slice(max(0, c - 2), c + 3))
        assert (labels["colour"][window] == list(scenes_v3.COLOURS).index(o.colour) + 1).any()
    digits = [int(ch) + 1 for ch in str(scene.number)]
    assert set(np.unique(labels["digit"])) - {0} <= set(digits)
    assert (labels["digit"] > 0).sum() >= 2  # two digits, several patches


def test_questions_are_answerable_and_balanced(scenes):
    rng = np.random.default_rng(0)
    per_type = {t: Counter() for t in questions_v3.QUESTION_TYPES}
    for s in scenes * 5:
        for q in questions_v3.sample_questions(s, rng):
            assert q.answer in questions_v3.ANSWERS[q.type]
            assert q.answer in [c.answer for c in questions_v3.candidates(s, q.type) if c.text == q.text] or \
                q.type == "count"
            per_type[q.type][q.answer] += 1
    for t in ("exist", "relation"):
        assert min(per_type[t].values()) > 0.3 * sum(per_type[t].values()) / 2
    assert len(per_type["count"]) >= 8  # counts up to 9 occur
    assert len(per_type["leftof"]) >= 4


def test_relation_and_leftof_answers_match_geometry(scenes):
    for s in scenes:
        names = dict((name, i) for i, name in questions_v3.references(s))
        for q in questions_v3.candidates(s, "relation"):
            head, rel_b = q.text[len("is the "):-2].split(" the ")
            a = head.removesuffix(" left of").removesuffix(" above")
            oa, ob = s.objects[names[a]], s.objects[names[rel_b]]
            if " left of" in q.text:
                assert (q.answer == "yes") == (oa.cx < ob.cx)
            else:
                assert (q.answer == "yes") == (oa.cy < ob.cy)
        for q in questions_v3.candidates(s, "leftof"):
            name = q.text[len("what colour is the object left of the "):-2]
            j = questions_v3.left_neighbour(s, names[name])
            assert s.objects[j].cx < s.objects[names[name]].cx and s.objects[j].colour == q.answer


def test_training_only_side_and_upper_follow_the_centre_and_keep_the_vocabulary(scenes):
    vocab = data_v3.vocabulary()
    middle = scenes_v3.IMAGE_SIZE / 2
    seen = Counter()
    for s in scenes:
        names = dict((name, i) for i, name in questions_v3.references(s))
        for qtype, word, axis in (("side", "left", "cx"), ("upper", "above", "cy")):
            for q in questions_v3.candidates(s, qtype):
                name = q.text[len("is the "):-len(f" {word} ?")]
                centre = getattr(s.objects[names[name]], axis)
                assert abs(centre - middle) >= questions_v3.HALF_MARGIN
                assert (q.answer == "yes") == (centre < middle)
                assert all(w in vocab for w in q.text.split())
                seen[(qtype, q.answer)] += 1
    assert min(seen[(t, a)] for t in ("side", "upper") for a in ("yes", "no")) > 10
    assert not set(questions_v3.TRAINING_TYPES) & set(questions_v3.QUESTION_TYPES)
    assert set(questions_v3.TRAINING_TYPES) <= set(questions_v3.ANSWERS)
    samples = data_v3.balanced_samples(calibration_split(), 4)  # never watched or scored
    assert {x["type"] for x in samples} == set(questions_v3.QUESTION_TYPES)
    batch = data_v3.question_batch(0, 0, 2, Packing(10), types=("side", "upper", "relation"))
    assert (batch["labels"] != -100).sum() > 0
    from vtprune.testbed.datasets import get_dataset
    from vtprune.testbed.train import types_at

    ds = get_dataset("shapes-v3")
    assert types_at("", 5, "side+upper", ds.question_types, ds.training_types)[-2:] == ("side", "upper")
    assert types_at("100:side+relation", 5, "", ds.question_types, ds.training_types) == ("side", "relation")
    with pytest.raises(ValueError, match="unknown question types"):
        types_at("100:digit", 5, "", ds.question_types, ds.training_types)


def test_splits_are_disjoint_streams():
    def digest(split: Split, i: int) -> str:
        return hashlib.sha1(np.asarray(scenes_v3.render(split.scene(i))).tobytes()).hexdigest()

    seen = {}
    for split in (train_split(0), train_split(1), calibration_split(), *heldout_splits()):
        for i in range(6):
            h = digest(split, i)
            assert h not in seen, (split, seen.get(h))
            seen[h] = split
    # the same seed in two splits is still two streams
    assert Split("train", 5).scene(0) != Split("test", 5).scene(0)


def test_calibration_routines_refuse_the_test_split():
    @calibration_routine
    def fit_threshold(model, split: Split, n: int = 4) -> int:
        return len(data_v3.balanced_samples(split, n))

    assert fit_threshold(None, calibration_split(), n=1) == len(questions_v3.QUESTION_TYPES)
    with pytest.raises(SplitError, match="held-out test split"):
        fit_threshold(None, heldout_splits()[0])
    with pytest.raises(SplitError, match="held-out test split"):
        fit_threshold(None, split=Split("test", 7))

    @calibration_routine
    def fit_on_samples(samples: list[dict]) -> int:
        return len(samples)

    test_samples = data_v3.balanced_samples(heldout_splits()[1], 1, types=("number",))
    with pytest.raises(SplitError):
        fit_on_samples(test_samples)
    assert fit_on_samples(data_v3.balanced_samples(calibration_split(), 1, types=("number",))) == 1
    with pytest.raises(SplitError):
        require_calibration(parse_split("test:30002"))
    assert require_calibration(parse_split("calibration")).seed == 20_000
    for bad in ("heldout", "test:x"):
        with pytest.raises(VtpruneError):
            parse_split(bad)


def test_balanced_samples_and_batches_have_v2_layouts():
    samples = data_v3.balanced_samples(calibration_split(), 10)
    assert Counter(s["type"] for s in samples) == dict.fromkeys(questions_v3.QUESTION_TYPES, 10)
    assert all(s["split"] == "calibration:20000" for s in samples)
    for t in ("colour", "count", "relation"):
        answers = Counter(s["answer"] for s in samples if s["type"] == t)
        assert max(answers.values()) <= -(-10 // len(questions_v3.ANSWERS[t]))
    batch = data_v3.question_batch(0, 0, 2, Packing(10))
    assert batch["pixel_values"].shape == (2, 3, 336, 336)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, Packing(10).length)
    assert (batch["input_ids"] == 4).sum(1).tolist() == [576, 576]
    assert batch["informative"].shape == (2, 576) and batch["informative"].any(1).all()
    pv, target = data_v3.dense_batch(0, 0, 2)
    assert pv.shape == (2, 3, 336, 336) and target["colour"].shape == (2, 576) and target["xy"].shape == (2, 576, 2)


def test_v3_processor_round_trips_every_answer_as_one_token():
    proc = data_v3.build_processor()
    vocab = data_v3.vocabulary()
    assert vocab["<image>"] == 4 and vocab["<pad>"] == 0
    for a in questions_v3.answer_vocabulary():
        assert proc.tokenizer.convert_tokens_to_ids(a) == vocab[a]
    ids = proc.tokenizer("USER: what number is in the box ? ASSISTANT:")["input_ids"]
    assert vocab["<unk>"] not in ids


def test_published_numbers_have_sources():
    entries = published_entries()
    assert {e["budget"] for e in entries} == {64, 128}
    assert all(e["source"].startswith("spec/") and 0 < e["relative"] <= 100 for e in entries)
    restore = published_scores(64)
    assert set(restore) >= {"fastv", "pdrop", "sparsevlm", "visionzip", "divprune", "vispruner"}
    with pytest.raises(VtpruneError):
        published_scores(32)


def test_spearman_on_synthetic_rankings():
    a = {"m1": 1.0, "m2": 2.0, "m3": 3.0, "m4": 4.0}
    assert spearman_rho(a, {k: 10 * v for k, v in a.items()})[0] == pytest.approx(1.0)
    assert spearman_rho(a, {k: -v for k, v in a.items()})[0] == pytest.approx(-1.0)
    # one swap of neighbours among 4: rho = 1 - 6*2/(4*15) = 0.8
    assert spearman_rho(a, {"m1": 1, "m2": 3, "m3": 2, "m4": 4})[0] == pytest.approx(0.8)
    # ties get average ranks; extra keys are ignored
    assert average_ranks(np.asarray([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    rho, common = spearman_rho(a | {"only_a": 9.0}, {"m1": 1, "m2": 1, "m3": 2, "m4": 3, "only_b": 0})
    assert common == ["m1", "m2", "m3", "m4"] and rho == pytest.approx(np.corrcoef([1, 2, 3, 4],
                                                                                  [1.5, 1.5, 3, 4])[0, 1])
    with pytest.raises(VtpruneError):
        spearman_rho({"a": 1, "b": 2}, {"a": 1, "b": 2})
    pub = published_scores(128)
    res = rank_correlation(pub, 128)
    assert res["rho"] == pytest.approx(1.0) and res["n"] == len(pub)
