"""benchmarks/v3_count_breakdown.py on hand-built scenes and records."""

import pytest

from scripts import benchmark_script
from vtprune.testbed.scenes_v3 import Object3, Scene3


def _scene(*objects):
    return Scene3(key=(0, 0, 0), objects=tuple(Object3(s, c, 50.0 + 30 * i, 50.0, size) for i, (s, c, size)
                                               in enumerate(objects)),
                  distractors=(), number=10, box=(0, 0, 20, 20), digit_height=14.0)


def test_counted_objects_follow_the_question():
    bd = benchmark_script("v3_count_breakdown")
    scene = _scene(("circle", "red", 10.0), ("square", "red", 30.0), ("circle", "blue", 20.0))
    assert [o.shape for o in bd.counted(scene, "how many red objects are there ?")] == ["circle", "square"]
    assert [o.colour for o in bd.counted(scene, "how many circles are there ?")] == ["red", "blue"]


def test_breakdown_groups_right_and_asked():
    bd = benchmark_script("v3_count_breakdown")
    small = _scene(("circle", "red", 10.0), ("square", "red", 30.0), ("circle", "blue", 20.0))
    big = _scene(("circle", "red", 30.0), ("square", "green", 30.0), ("circle", "blue", 40.0))
    samples = [{"id": "a", "scene": small, "question": "how many circles are there ?", "answer": "2"},
               {"id": "b", "scene": big, "question": "how many red objects are there ?", "answer": "1"},
               {"id": "c", "scene": big, "question": "how many crosses are there ?", "answer": "0"}]
    records = [{"id": "a", "type": "count", "correct": False}, {"id": "b", "type": "count", "correct": True},
               {"id": "c", "type": "count", "correct": True}, {"id": "x", "type": "colour", "correct": True}]
    table = bd.breakdown(records, samples)
    assert table["counted attribute"] == {"colour": (1, 1), "shape": (1, 2)}
    assert list(table["smallest counted object"].items()) == [("none counted", (1, 1)), ("< 1 patch", (0, 1)),
                                                                   (">= 2 patches", (1, 1))]
    assert list(table["answer k"]) == ["0", "1", "2"] and table["objects in the scene"] == {"3-5": (2, 3)}
    assert bd.format_breakdown(table)[1].split() == ["colour", "1/1", "1.00", "(0.21-1.00)"]
    with pytest.raises(SystemExit, match="--split and --per-type"):
        bd.breakdown(records, samples[1:])
