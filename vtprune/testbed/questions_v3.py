"""Questions of the v3 benchmark: single-token answers that need evidence from one or several places.

| type | example | answers |
|---|---|---|
| colour | what colour is the triangle ? (the only triangle) | 6 colours |
| shape | what shape is the red object ? (the only red object) | 4 shapes |
| exist | is there a blue cross ? (negatives mostly near misses) | yes / no |
| count | how many green objects are there ? / how many circles are there ? | 0 .. 9 |
| relation | is the red circle left of the cross ? / is the square above the blue object ? | yes / no |
| leftof | what colour is the object left of the yellow square ? | 6 colours |
| number | what number is in the box ? | 10 .. 99 (one token) |

Training-only types (asked when a training run lists them, never scored): `side` ("is the red circle left ?":
is its centre in the image's left half) and `upper` ("is the triangle above ?": in the top half). Unlike
relation they have a first-order signal (an object's own position decides the answer), a stepping stone to
reading positions; their words are v3 question words, so the vocabulary stays the same.

Objects are named by a unique shape ("the triangle"), a unique colour ("the red object") or a unique
colour + shape pair ("the red circle"). Relations are asked only when the two centres differ by >= 2
patches along the asked axis; "the object left of X" is asked only when exactly one object lies left of X
within X's row band and no other object is near that band's edge.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from .questions import PLURAL, Question
from .scenes import COLOURS, IMAGE_SIZE, SHAPES
from .scenes_v3 import CELL, MAX_COUNT, NUMBER_RANGE, Object3, Scene3

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "exist", "count", "relation", "leftof", "number")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "exist": ("yes", "no"),
    "count": tuple(str(i) for i in range(MAX_COUNT + 1)),
    "relation": ("yes", "no"),
    "leftof": tuple(COLOURS),
    "number": tuple(str(i) for i in range(NUMBER_RANGE[0], NUMBER_RANGE[1] + 1)),
    "side": ("yes", "no"),  # training-only types (TRAINING_TYPES)
    "upper": ("yes", "no"),
}
TRAINING_TYPES: tuple[str, ...] = ("side", "upper")
RELATION_GAP = 2 * CELL  # pixels between the two centres along the asked axis
HALF_MARGIN = CELL  # side / upper: pixels between an object's centre and the image's middle line


def answer_vocabulary() -> tuple[str, ...]:
    """All answer words, each once, in a fixed order."""
    seen: dict[str, None] = {}
    for t in QUESTION_TYPES:
        for a in ANSWERS[t]:
            seen.setdefault(a, None)
    return tuple(seen)


def question_words() -> tuple[str, ...]:
    """Every word a v3 question can contain."""
    words = {"what", "colour", "is", "the", "shape", "object", "objects", "there", "a", "how", "many", "are",
             "left", "of", "above", "number", "in", "box", "?"}
    words |= set(COLOURS) | set(SHAPES) | set(PLURAL.values())
    return tuple(sorted(words))


def references(scene: Scene3) -> list[tuple[int, str]]:
    """(object index, name) for every unambiguous name: unique shape, unique colour, unique colour + shape."""
    objs = scene.objects
    colours = Counter(o.colour for o in objs)
    shapes = Counter(o.shape for o in objs)
    pairs = Counter((o.colour, o.shape) for o in objs)
    out = []
    for i, o in enumerate(objs):
        if shapes[o.shape] == 1:
            out.append((i, o.shape))
        if colours[o.colour] == 1:
            out.append((i, f"{o.colour} object"))
        if pairs[(o.colour, o.shape)] == 1 and shapes[o.shape] > 1 and colours[o.colour] > 1:
            out.append((i, f"{o.colour} {o.shape}"))
    return out


def left_neighbour(scene: Scene3, i: int) -> int | None:
    """Index of the only object left of object i in its row band (|dy| <= half the larger side + 4 px, the
    other's centre >= one patch further left), or None when there is none, several, or one near the band's
    edge (|dy| within 8 px more)."""
    objs = scene.objects
    o = objs[i]
    cx = np.asarray([p.cx for p in objs])
    cy = np.asarray([p.cy for p in objs])
    sz = np.asarray([p.size for p in objs])
    left = cx <= o.cx - CELL
    band = np.abs(cy - o.cy) <= np.maximum(sz, o.size) / 2 + 4
    near = np.abs(cy - o.cy) <= np.maximum(sz, o.size) / 2 + 12
    inside = np.flatnonzero(left & band)
    if len(inside) != 1 or (left & near).sum() != 1:
        return None
    return int(inside[0])


def _count_noun(attr: str, val: str) -> str:
    return f"{val} objects" if attr == "colour" else PLURAL[val]


# the text of every count question -> the column it counts in `scenes_v3.object_centres` (colours, then shapes)
COUNT_CHANNELS: dict[str, int] = {
    f"how many {_count_noun(attr, v)} are there ?": offset + i
    for attr, values, offset in (("colour", COLOURS, 0), ("shape", SHAPES, len(COLOURS))) for i, v in enumerate(values)}


def candidates(scene: Scene3, qtype: str) -> list[Question]:
    """Every valid question of one type for a scene, with its answer."""
    objs: tuple[Object3, ...] = scene.objects
    out: list[Question] = []
    if qtype == "colour":
        out = [Question(qtype, f"what colour is the {name} ?", objs[i].colour) for i, name in references(scene)
               if " " not in name and name in SHAPES]
    elif qtype == "shape":
        out = [Question(qtype, f"what shape is the {name} ?", objs[i].shape) for i, name in references(scene)
               if name.endswith(" object")]
    elif qtype == "exist":
        present = {(o.colour, o.shape) for o in objs}
        out = [Question(qtype, f"is there a {c} {s} ?", "yes" if (c, s) in present else "no")
               for c in COLOURS for s in SHAPES]
    elif qtype == "count":
        colours = Counter(o.colour for o in objs)
        shapes = Counter(o.shape for o in objs)
        for attr, counter, values in (("colour", colours, COLOURS), ("shape", shapes, SHAPES)):
            for v in values:
                if counter[v] <= MAX_COUNT:
                    out.append(Question(qtype, f"how many {_count_noun(attr, v)} are there ?", str(counter[v])))
    elif qtype == "relation":
        refs = references(scene)
        for i, a in refs:
            for j, b in refs:
                if i == j:
                    continue
                dx, dy = objs[j].cx - objs[i].cx, objs[j].cy - objs[i].cy
                if abs(dx) >= RELATION_GAP:
                    out.append(Question(qtype, f"is the {a} left of the {b} ?", "yes" if dx > 0 else "no"))
                if abs(dy) >= RELATION_GAP:
                    out.append(Question(qtype, f"is the {a} above the {b} ?", "yes" if dy > 0 else "no"))
    elif qtype == "leftof":
        for i, name in references(scene):
            j = left_neighbour(scene, i)
            if j is not None:
                out.append(Question(qtype, f"what colour is the object left of the {name} ?", objs[j].colour))
    elif qtype == "number":
        out = [Question(qtype, "what number is in the box ?", str(scene.number))]
    elif qtype in ("side", "upper"):
        word = "left" if qtype == "side" else "above"
        for i, name in references(scene):
            centre = objs[i].cx if qtype == "side" else objs[i].cy
            if abs(centre - IMAGE_SIZE / 2) >= HALF_MARGIN:
                out.append(Question(qtype, f"is the {name} {word} ?", "yes" if centre < IMAGE_SIZE / 2 else "no"))
    else:
        raise ValueError(f"unknown v3 question type {qtype!r} "
                         f"(known: {', '.join(QUESTION_TYPES + TRAINING_TYPES)})")
    return out


_NAMED = {
    "colour": re.compile(r"what colour is the (.+) \?"),
    "shape": re.compile(r"what shape is the (.+) \?"),
    "side": re.compile(r"is the (.+) left \?"),
    "upper": re.compile(r"is the (.+) above \?"),
    "relation": re.compile(r"is the (.+) (?:left of|above) the (.+) \?"),
    "leftof": re.compile(r"what colour is the object left of the (.+) \?"),
}


def names_second(question: Question) -> bool:
    """Whether the question names its second fetched object (a relation's other object), so that it can be found
    from the words alone, like the first; leftof's second object (the left neighbour) is found from the first."""
    return question.type == "relation"


_EXIST = re.compile(r"is there a (\w+) (\w+) \?")


def exist_matches(scene: Scene3, question: Question) -> list[int]:
    """Indices of the objects an exist question asks about (its colour and shape; none when the answer is no)."""
    match = _EXIST.fullmatch(question.text) if question.type == "exist" else None
    if match is None:
        raise ValueError(f"not an exist question of this benchmark: {question.text!r}")
    return [i for i, o in enumerate(scene.objects) if (o.colour, o.shape) == match.groups()]


def name_ends(question: Question) -> tuple[int, int]:
    """Word indices (in `question.text.split()`) of the last word of the first named object (an exist question's
    asked object, present or not) and of the named second object (a relation's; `names_second`), -1 where the
    question names none (count, number; the second of every type but relation). Where the training-only
    name-position fetch targets sit (`fetch_attention.py`)."""
    if question.type == "exist":
        return len(question.text.split()) - 2, -1  # "is there a red circle ?"
    pattern = _NAMED.get(question.type)
    if pattern is None:
        return -1, -1
    match = _match(pattern, question)
    return _last_word(match, 1), _last_word(match, 2) if names_second(question) else -1


def _match(pattern: re.Pattern, question: Question) -> re.Match:
    match = pattern.fullmatch(question.text)
    if match is None:
        raise ValueError(f"not a {question.type} question of this benchmark: {question.text!r}")
    return match


def _last_word(match: re.Match, group: int) -> int:
    """Word index (in the question's `text.split()`) of the last word of `group`."""
    return len(match.string[: match.end(group)].split()) - 1


_COUNT = re.compile(r"how many (.+) are there \?")


def count_phrase_end(question: Question) -> int:
    """Word index (in `question.text.split()`) of the last word of a count question's counted phrase ("objects" of
    "how many green objects are there ?"), -1 for other types: where the name-position count target sits
    (`TrainConfig.count_attention_at = "name"`)."""
    if question.type != "count":
        return -1
    return _last_word(_match(_COUNT, question), 1)


def fetched_objects(scene: Scene3, question: Question) -> tuple[int | None, int | None]:
    """Indices of the objects whose place the answer depends on: (the named object, the second one: a relation's
    other named object or leftof's left neighbour); None where a type has none (exist, count, number)."""
    pattern = _NAMED.get(question.type)
    if pattern is None:
        return None, None
    match = _match(pattern, question)
    index = {name: i for i, name in references(scene)}
    first = index[match.group(1)]
    if question.type == "relation":
        return first, index[match.group(2)]
    if question.type == "leftof":
        return first, left_neighbour(scene, first)
    return first, None


def sample_question(scene: Scene3, qtype: str, rng: np.random.Generator) -> Question | None:
    """One question of `qtype` with the answer drawn uniformly first (balanced answers): counting falls back
    to the planted count group, existence negatives are mostly near misses (colour or shape present)."""
    cands = candidates(scene, qtype)
    if not cands:
        return None
    target = str(rng.choice(ANSWERS[qtype]))
    hits = [q for q in cands if q.answer == target]
    if qtype == "exist" and target == "no":
        colours = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        near = [q for q in hits if q.text.split()[3] in colours or q.text.split()[4] in shapes]
        if near and rng.random() < 0.8:
            hits = near
    if hits:
        return hits[int(rng.integers(len(hits)))]
    if qtype == "count":
        attr, val = scene.count_key
        n = sum(1 for o in scene.objects if getattr(o, attr) == val)
        return Question("count", f"how many {_count_noun(attr, val)} are there ?", str(n))
    return cands[int(rng.integers(len(cands)))]


def sample_questions(scene: Scene3, rng: np.random.Generator,
                     types: tuple[str, ...] = QUESTION_TYPES) -> list[Question]:
    """One question per type (types without a valid question are skipped), in random order."""
    qs = [q for t in types if (q := sample_question(scene, t, rng)) is not None]
    return [qs[int(i)] for i in rng.permutation(len(qs))]
