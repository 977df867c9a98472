"""Generator: determinism, answers re-derived from the scene graph, rendering, balance, export."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from vtprune.testbed.data import balanced_samples
from vtprune.testbed.evaluate import majority_baseline
from vtprune.testbed.export import export_jsonl, read_jsonl
from vtprune.testbed.questions import (
    ANSWERS,
    QUESTION_TYPES,
    TRAINING_TYPES,
    candidates,
    references,
    sample_questions,
)
from vtprune.testbed.scenes import CELL, COLOURS, GRID, make_scene, patch_labels, render

# Independent re-derivation: parse the question text, then look the answer up in the scene graph.
_SINGULAR = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


def referent(objs, name: str):
    """The one object called "triangle" (its only triangle) or "red object" (its only red object)."""
    words = name.split()
    hit = [o for o in objs if (o.colour == words[0] if words[-1] == "object" else o.shape == name)]
    assert len(hit) == 1 and len(words) <= 2, name
    return hit[0]


def derive(scene, text: str) -> str:
    objs = scene.objects
    if m := re.fullmatch(r"what colour is the (\w+) \?", text):
        hit = [o for o in objs if o.shape == m[1]]
        assert len(hit) == 1, text
        return hit[0].colour
    if m := re.fullmatch(r"what shape is the (\w+) object \?", text):
        hit = [o for o in objs if o.colour == m[1]]
        assert len(hit) == 1, text
        return hit[0].shape
    if m := re.fullmatch(r"is there a (\w+) (\w+) \?", text):
        return "yes" if any(o.colour == m[1] and o.shape == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"how many (\w+) objects are there \?", text):
        return str(sum(o.colour == m[1] for o in objs))
    if m := re.fullmatch(r"how many (\w+) are there \?", text):
        return str(sum(o.shape == _SINGULAR[m[1]] for o in objs))
    if m := re.fullmatch(r"is the (.+) left of the (.+) \?", text):
        a, b = referent(objs, m[1]), referent(objs, m[2])
        assert min(a.col, b.col) <= 10 and max(a.col, b.col) >= 13, text  # opposite halves, no near-ties
        return "yes" if a.col < b.col else "no"
    if m := re.fullmatch(r"is the (.+) left \?", text):  # training-only "side"
        a = referent(objs, m[1])
        assert a.col <= 10 or a.col >= 13, text
        return "yes" if a.col < 12 else "no"
    if text == "what number is in the box ?":
        return str(scene.digit)
    raise AssertionError(f"unparsed question {text!r}")


def test_scenes_and_images_are_deterministic():
    for i in range(3):
        a, b = make_scene(5, i), make_scene(5, i)
        assert a == b
        assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert make_scene(5, 0) != make_scene(6, 0)
    assert make_scene(5, 0) != make_scene(5, 1)


def test_every_candidate_answer_matches_the_scene_graph():
    for i in range(60):
        scene = make_scene(11, i)
        pairs = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)
        for t in QUESTION_TYPES + TRAINING_TYPES:
            for q in candidates(scene, t):
                assert q.answer in ANSWERS[t]
                assert derive(scene, q.text) == q.answer, (q, scene)


def test_spatial_questions_cover_every_opposite_half_pair_and_are_not_scored_types():
    """Every ordered pair of names (an object by its unique shape or unique colour) on opposite halves gets
    one spatial question; "side" is asked in training only, so held-out sets and exports never contain it."""
    assert "side" not in QUESTION_TYPES and set(ANSWERS["side"]) == set(ANSWERS["spatial"])
    for i in range(40):
        scene = make_scene(12, i)
        names = references(scene)
        left = sum(o.col <= 10 for o, _ in names)
        right = sum(o.col >= 13 for o, _ in names)
        assert len(candidates(scene, "spatial")) == 2 * left * right
        assert len(candidates(scene, "side")) == left + right
    counts = Counter(q.answer for i in range(300)
                     for q in sample_questions(make_scene(13, i), np.random.default_rng(i), ("side",)))
    assert set(counts) == {"yes", "no"} and max(counts.values()) / sum(counts.values()) < 0.6


def test_rendered_cells_show_the_scene():
    for i in range(10):
        scene = make_scene(3, i)
        img = np.asarray(render(scene)).astype(np.float32)
        for o in scene.objects:
            cell = img[o.row * CELL:(o.row + 1) * CELL, o.col * CELL:(o.col + 1) * CELL].reshape(-1, 3)
            dist = np.linalg.norm(cell - np.asarray(COLOURS[o.colour], np.float32), axis=1)
            assert (dist < 60).sum() >= 8, (o, scene.seed)  # at least 8 pixels of the object's colour
        box = img[scene.digit_row * CELL:(scene.digit_row + 1) * CELL,
                  scene.digit_col * CELL:(scene.digit_col + 1) * CELL].mean(-1)
        assert box[1:-1, 1:-1].max() > 190 and box[0].mean() < 90  # light paper, dark frame
        labels = patch_labels(scene)
        assert labels["colour"].shape == (GRID, GRID)
        assert (labels["colour"] > 0).sum() == len(scene.objects) and (labels["digit"] > 0).sum() == 1


def test_training_sampler_is_roughly_balanced():
    counts = {t: Counter() for t in QUESTION_TYPES}
    for i in range(600):
        scene = make_scene(21, i)
        for q in sample_questions(scene, np.random.default_rng([21, i])):
            counts[q.type][q.answer] += 1
    for t, c in counts.items():
        uniform = 1 / len(ANSWERS[t])
        assert set(c) == set(ANSWERS[t]), t
        assert max(c.values()) / sum(c.values()) < uniform + 0.12, (t, c)


def test_held_out_set_is_balanced():
    samples = balanced_samples(seed=9, n_per_type=20)
    base = majority_baseline(samples)
    for t in QUESTION_TYPES:
        assert sum(s["type"] == t for s in samples) == 20
        assert base[t] <= 1 / len(ANSWERS[t]) + 0.06, (t, base[t])
    for s in samples:
        assert derive(s["scene"], s["question"]) == s["answer"]
    assert len({s["id"] for s in samples}) == len(samples)


@pytest.mark.parametrize("n", [6])
def test_export_jsonl(tmp_path, n):
    path = export_jsonl(tmp_path, seed=4, n_per_type=n)
    samples, root = read_jsonl(path)
    assert len(samples) == n * len(QUESTION_TYPES)
    for s in samples:
        assert set(s) == {"id", "image", "question", "answer", "type"}
        assert (root / s["image"]).exists() and not s["image"].startswith("/")
    scenes = [json.loads(line) for line in open(tmp_path / "scenes.jsonl")]
    assert {s["image"] for s in samples} == {s["image"] for s in scenes}
