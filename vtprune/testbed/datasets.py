"""The data a training run reads, by name: `shapes-v2` (the shipped `builtin:shapes-llava`) or `shapes-v3`.

`train.train` takes everything data-dependent from one `Dataset` (`TrainConfig.data`), so one trainer serves
both benchmarks: scenes and their dense patch targets (Stage A, the probe init, Stage C), packed question
batches (Stage B), the watched set, the vocabulary / processor / fresh model, and the scored question types.
Integer seeds name training streams (v3: the train split of that seed); the watched set of a v3 run is the
calibration split (`splits.py`), never the test split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vtprune.errors import VtpruneError


@dataclass(frozen=True)
class Dataset:
    """Callables and constants of one benchmark version (see the module docstring)."""

    version: str
    question_types: tuple[str, ...]
    training_types: tuple[str, ...]  # unscored types a type schedule may also ask
    answers: tuple[str, ...]  # answer words `evaluate` restricts the prediction to
    build_model: Callable  # (size, seed) -> LlavaForConditionalGeneration
    build_processor: Callable  # () -> LlavaProcessor
    dense_batch: Callable  # (seed, start, n) -> (pixels [n, 3, 336, 336], targets)
    question_batch: Callable  # data.question_batch's signature
    scene_pixels: Callable  # (seed, indices) -> pixels [len, 3, 336, 336]
    watched_samples: Callable  # (seed, n_per_type) -> samples watched during training


def _v2() -> Dataset:
    from . import data, model, questions, scenes, tokenizer

    def scene_pixels(seed: int, indices: list[int]):
        return data.pixels([scenes.render(scenes.make_scene(seed, i)) for i in indices])

    return Dataset(
        version=scenes.DATA_VERSION, question_types=questions.QUESTION_TYPES,
        training_types=questions.TRAINING_TYPES, answers=questions.answer_vocabulary(),
        build_model=lambda size, seed: model.build_model(size, seed=seed),
        build_processor=tokenizer.build_processor, dense_batch=data.dense_batch,
        question_batch=data.question_batch, scene_pixels=scene_pixels,
        watched_samples=lambda seed, n: data.balanced_samples(seed, n, id_prefix="eval"))


def _v3() -> Dataset:
    from . import data_v3, questions_v3, scenes_v3, splits

    return Dataset(
        version=scenes_v3.DATA_VERSION, question_types=questions_v3.QUESTION_TYPES,
        training_types=questions_v3.TRAINING_TYPES,
        answers=questions_v3.answer_vocabulary(),
        build_model=lambda size, seed: data_v3.build_model(size, seed=seed),
        build_processor=data_v3.build_processor, dense_batch=data_v3.dense_batch,
        question_batch=data_v3.question_batch, scene_pixels=data_v3.scene_pixels,
        watched_samples=lambda seed, n: data_v3.balanced_samples(splits.calibration_split(seed), n))


_DATASETS: dict[str, Callable[[], Dataset]] = {"shapes-v2": _v2, "shapes-v3": _v3}


def dataset_names() -> list[str]:
    """Accepted `TrainConfig.data` values."""
    return sorted(_DATASETS)


def get_dataset(name: str) -> Dataset:
    """The `Dataset` of a benchmark version ("shapes-v2" or "shapes-v3")."""
    if name not in _DATASETS:
        raise VtpruneError(f"unknown testbed data {name!r} (accepted: {', '.join(dataset_names())})")
    return _DATASETS[name]()
