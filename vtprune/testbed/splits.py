"""Three disjoint data splits of the v3 benchmark, with fixed seeds, enforced in code.

- **train**: what the built-in model learns from (Stage A scenes of seed s, Stage B scenes of seed s + 1);
- **calibration**: the only data any default may be tuned or calibrated on (DCP-Prune's τ_κ, RCP training,
  recovery strengths, thresholds, the checkpoint chosen during training);
- **test** (held-out): reporting only, three seeds for the headline table.

Scenes are drawn from `numpy.random.default_rng([split code, seed, index, ...])`: the split's code is part
of the generator's entropy, so the splits are independent streams whatever the seeds.

A calibration routine takes a `Split` and calls `require_calibration(split)` (or is decorated with
`@calibration_routine`, which checks every `Split` argument and every list of samples): the test split is
refused with a `SplitError`, so no default can be fitted to the numbers it is reported on.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from vtprune.errors import VtpruneError

SPLIT_CODES: dict[str, int] = {"train": 1, "calibration": 2, "test": 3}
TRAIN_SEED = 0
CALIBRATION_SEED = 20_000
TEST_SEEDS: tuple[int, ...] = (30_000, 30_001, 30_002)


class SplitError(VtpruneError):
    """A split used for what it is not for (e.g. a calibration routine given the held-out test split)."""


@dataclass(frozen=True)
class Split:
    """One stream of v3 scenes: `name` in train / calibration / test and a seed."""

    name: str
    seed: int

    def __post_init__(self) -> None:
        if self.name not in SPLIT_CODES:
            raise SplitError(f"unknown split {self.name!r} (accepted: {', '.join(SPLIT_CODES)})")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SplitError(f"split seed must be a non-negative int, got {self.seed!r}")

    @property
    def code(self) -> int:
        """The split's code, mixed into every scene generator of the split."""
        return SPLIT_CODES[self.name]

    def scene(self, index: int):
        """Scene `index` of this split (a `scenes_v3.Scene3`)."""
        from .scenes_v3 import make_scene

        return make_scene(self.code, self.seed, index)

    def __str__(self) -> str:
        return f"{self.name}:{self.seed}"


def train_split(seed: int = TRAIN_SEED) -> Split:
    """The training split of training seed `seed`."""
    return Split("train", seed)


def calibration_split(seed: int = CALIBRATION_SEED) -> Split:
    """The calibration split (the only data defaults may be tuned on)."""
    return Split("calibration", seed)


def heldout_splits() -> tuple[Split, ...]:
    """The held-out test splits of the headline table (three seeds)."""
    return tuple(Split("test", s) for s in TEST_SEEDS)


def parse_split(text: str) -> Split:
    """"calibration", "test", "test:30001", "train:0" -> Split (default seed per split)."""
    name, _, seed = str(text).partition(":")
    default = {"train": TRAIN_SEED, "calibration": CALIBRATION_SEED, "test": TEST_SEEDS[0]}
    if name not in default:
        raise SplitError(f"unknown split {text!r} (accepted: train[:SEED], calibration[:SEED], test[:SEED])")
    try:
        return Split(name, int(seed) if seed else default[name])
    except ValueError:
        raise SplitError(f"split seed must be an integer, got {text!r}") from None


def require_calibration(split: Split, routine: str = "a calibration routine") -> Split:
    """Return `split` if calibration may read it; the held-out test split raises `SplitError`."""
    if not isinstance(split, Split):
        raise SplitError(f"{routine} needs a vtprune.testbed.splits.Split, got {type(split).__name__}")
    if split.name == "test":
        raise SplitError(f"{routine} may not read the held-out test split ({split}); use the calibration split "
                         f"(vtprune.testbed.splits.calibration_split())")
    return split


F = TypeVar("F", bound=Callable)


def _check_value(value, routine: str) -> None:
    if isinstance(value, Split):
        require_calibration(value, routine)
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
        tagged = {str(s.get("split", "")).split(":")[0] for s in value if isinstance(s, dict)}
        if "test" in tagged:
            raise SplitError(f"{routine} was given samples of the held-out test split; use the calibration split")


def calibration_routine(func: F) -> F:
    """Decorator: the routine refuses the held-out test split in any argument (a `Split`, or a list of samples
    tagged with their split by `data_v3.balanced_samples`)."""
    sig = inspect.signature(func)
    name = getattr(func, "__qualname__", "a calibration routine")

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        for value in bound.arguments.values():
            _check_value(value, name)
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
