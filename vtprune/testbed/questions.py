"""Question types with single-token answers, derived from the scene graph, with balanced sampling."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS, MAX_COUNT, SHAPES, Scene, SceneObject

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "exist", "count", "spatial", "digit")
# Asked in training only, never scored: "is the X left ?" (is the object in the left half of the image),
# an auxiliary task that teaches the decoder to read an object's column before it compares two objects.
TRAINING_TYPES: tuple[str, ...] = ("side",)
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Spatial questions are asked only about two objects on opposite halves of the image: one in columns
# 0..LEFT_MAX_COL, the other in RIGHT_MIN_COL..23 (no near-ties; at least 3 columns apart).
LEFT_MAX_COL = 10
RIGHT_MIN_COL = 13

ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "exist": ("yes", "no"),
    "count": tuple(str(i) for i in range(MAX_COUNT + 1)),
    "spatial": ("yes", "no"),
    "side": ("yes", "no"),
    "digit": tuple(str(i) for i in range(10)),
}


@dataclass(frozen=True)
class Question:
    """One question about one scene; `answer` is a single vocabulary word."""

    type: str
    text: str
    answer: str


def half(col: int) -> str | None:
    """"left" for columns 0..LEFT_MAX_COL, "right" for RIGHT_MIN_COL..23, None for the middle columns."""
    if col <= LEFT_MAX_COL:
        return "left"
    return "right" if col >= RIGHT_MIN_COL else None


def references(scene: Scene) -> list[tuple[SceneObject, str]]:
    """Unambiguous names of objects by one attribute, as the colour and shape questions use them:
    "triangle" for the only triangle, "red object" for the only red object (both when both are unique)."""
    colours = Counter(o.colour for o in scene.objects)
    shapes = Counter(o.shape for o in scene.objects)
    out = []
    for o in scene.objects:
        if shapes[o.shape] == 1:
            out.append((o, o.shape))
        if colours[o.colour] == 1:
            out.append((o, f"{o.colour} object"))
    return out


def candidates(scene: Scene, qtype: str) -> list[Question]:
    """Every valid question of one type for a scene, with its answer."""
    objs = scene.objects
    colours = Counter(o.colour for o in objs)
    shapes = Counter(o.shape for o in objs)
    out: list[Question] = []
    if qtype == "colour":
        for o in objs:
            if shapes[o.shape] == 1:
                out.append(Question(qtype, f"what colour is the {o.shape} ?", o.colour))
    elif qtype == "shape":
        for o in objs:
            if colours[o.colour] == 1:
                out.append(Question(qtype, f"what shape is the {o.colour} object ?", o.shape))
    elif qtype == "exist":
        present = {(o.colour, o.shape) for o in objs}
        for c in COLOURS:
            for s in SHAPES:
                out.append(Question(qtype, f"is there a {c} {s} ?", "yes" if (c, s) in present else "no"))
    elif qtype == "count":
        for c in COLOURS:
            if colours[c] <= MAX_COUNT:
                out.append(Question(qtype, f"how many {c} objects are there ?", str(colours[c])))
        for s in SHAPES:
            if shapes[s] <= MAX_COUNT:
                out.append(Question(qtype, f"how many {PLURAL[s]} are there ?", str(shapes[s])))
    elif qtype == "spatial":
        named = [(half(o.col), name) for o, name in references(scene)]
        for side_a, name_a in named:
            for side_b, name_b in named:
                if side_a and side_b and side_a != side_b:
                    answer = "yes" if side_a == "left" else "no"
                    out.append(Question(qtype, f"is the {name_a} left of the {name_b} ?", answer))
    elif qtype == "side":
        for o, name in references(scene):
            if half(o.col) is not None:
                out.append(Question(qtype, f"is the {name} left ?", "yes" if half(o.col) == "left" else "no"))
    elif qtype == "digit":
        out.append(Question(qtype, "what number is in the box ?", str(scene.digit)))
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    return out


def _count_key_question(scene: Scene) -> Question:
    attr, val = scene.count_key
    n = sum(1 for o in scene.objects if getattr(o, attr) == val)
    noun = f"{val} objects" if attr == "colour" else PLURAL[val]
    text = f"how many {noun} are there ?"
    return Question("count", text, str(n))


def sample_question(scene: Scene, qtype: str, rng: np.random.Generator) -> Question | None:
    """One question of `qtype`, answer chosen uniformly first so answers stay balanced.

    Counting prefers the scene's planted count group (uniform 0..4) when the drawn answer is missing;
    existence negatives are drawn mostly among near misses (colour or shape present).
    """
    cands = candidates(scene, qtype)
    if not cands:
        return None
    target = str(rng.choice(ANSWERS[qtype]))
    hits = [q for q in cands if q.answer == target]
    if qtype == "exist" and target == "no":
        colours = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        near = [q for q in hits if any(f" {c} " in q.text for c in colours) or
                any(q.text.endswith(f" {s} ?") for s in shapes)]
        if near and rng.random() < 0.8:
            hits = near
    if hits:
        return hits[int(rng.integers(len(hits)))]
    if qtype == "count":
        return _count_key_question(scene)
    return cands[int(rng.integers(len(cands)))]


def sample_questions(scene: Scene, rng: np.random.Generator,
                     types: tuple[str, ...] = QUESTION_TYPES) -> list[Question]:
    """One question per type (types without a valid question are skipped), in random order."""
    qs = [q for t in types if (q := sample_question(scene, t, rng)) is not None]
    return [qs[int(i)] for i in rng.permutation(len(qs))]


def answer_vocabulary() -> tuple[str, ...]:
    """All answer words, each once, in a fixed order."""
    seen: dict[str, None] = {}
    for t in QUESTION_TYPES:
        for a in ANSWERS[t]:
            seen.setdefault(a, None)
    return tuple(seen)


def question_words() -> tuple[str, ...]:
    """Every word that can occur in a question (for the word-level vocabulary). "or" and "right" belong to the
    shapes-v1 spatial phrasing; they stay so that the vocabulary (and token ids) of v1 checkpoints are kept."""
    words = {"what", "colour", "is", "the", "shape", "object", "objects", "there", "a", "how", "many",
             "are", "left", "or", "right", "of", "number", "in", "box", "?"}
    words |= set(COLOURS) | set(SHAPES) | set(PLURAL.values())
    return tuple(sorted(words))
