"""Which built-in benchmark a model answers (`shapes-v2` or `shapes-v3`), its answer words and its held-out
questions.

A v3 model (the default built-in, `vtprune.shipped.DEFAULT_BUILTIN`) is scored on the held-out *test* split
(`vtprune.testbed.splits`, seeds 30000 / 30001 / 30002), `V3_N_PER_TYPE` questions per type and seed by
default: that makes the whole `vtprune compare` table (every method × 5 budgets × 3 seeds) finish in about
40 minutes on one CPU core (docs/testbed.md, "v3 results"). A v2 model (`builtin:shapes-llava`) keeps its
one held-out seed (10002) and 50 questions per type.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vtprune.errors import VtpruneError

V2, V3 = "shapes-v2", "shapes-v3"
#: v2: questions per type of the one held-out seed (as before v3)
V2_N_PER_TYPE = 50
#: v3: questions per type *and test seed*; 20 × 7 types × 3 seeds = 420 questions per cell (runtime: see docs)
V3_N_PER_TYPE = 20
#: v3 `vtprune demo`: one test seed, this many questions per type (under 3 minutes on 2 cores)
V3_DEMO_N_PER_TYPE = 10


def benchmark_of(processor) -> str:
    """`shapes-v3` when the processor's tokenizer has the whole v3 vocabulary (two-digit numbers, the v3
    question words), else `shapes-v2`."""
    from vtprune.testbed.data_v3 import vocabulary

    tok = getattr(processor, "tokenizer", processor)
    return V3 if set(vocabulary()) <= set(tok.get_vocab()) else V2


def answer_words(benchmark: str) -> list[str]:
    """The answer words `evaluate` restricts its prediction to on `benchmark`."""
    if benchmark == V3:
        from vtprune.testbed.questions_v3 import answer_vocabulary

        return list(answer_vocabulary())
    if benchmark == V2:
        from vtprune.testbed.questions import answer_vocabulary

        return list(answer_vocabulary())
    raise VtpruneError(f"unknown benchmark {benchmark!r} (accepted: {V2}, {V3})")


def heldout_seeds() -> tuple[int, ...]:
    """The held-out test seeds of the headline table (`splits.TEST_SEEDS`)."""
    from vtprune.testbed.splits import TEST_SEEDS

    return tuple(TEST_SEEDS)


def parse_seeds(text: str) -> list[int]:
    """ "30000,30001" -> [30000, 30001]: distinct non-negative ints, else a `VtpruneError` saying what is accepted."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        seeds = [int(t) for t in items]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise VtpruneError(f"expected comma-separated distinct seeds >= 0 (e.g. 30000,30001,30002), got {text!r}")
    return seeds


def v3_test_samples(n_per_type: int, seeds: Iterable[int] | None = None) -> list[dict]:
    """Balanced questions of the held-out test split, `n_per_type` per type for each seed, seed after seed;
    every sample carries `split` ("test:SEED")."""
    from vtprune.testbed.data_v3 import balanced_samples
    from vtprune.testbed.splits import Split

    if isinstance(n_per_type, bool) or not isinstance(n_per_type, int) or n_per_type < 1:
        raise VtpruneError(f"questions per type must be an int >= 1, got {n_per_type!r}")
    return [s for seed in (seeds or heldout_seeds()) for s in balanced_samples(Split("test", int(seed)), n_per_type)]


def sample_seed(sample: dict) -> int | None:
    """The test seed of a v3 sample ("split": "test:30001" -> 30001); None for untagged (v2, JSONL) samples."""
    tag = sample.get("split") if isinstance(sample, dict) else None
    if not tag:
        return None
    name, _, seed = str(tag).partition(":")
    return int(seed) if name == "test" and seed.isdigit() else None


def per_seed_accuracy(correct: Sequence[bool], samples: Sequence[dict]) -> dict[str, float]:
    """{seed (str): accuracy} over the test seeds the samples carry (same order as `correct`); {} when untagged."""
    if len(correct) != len(samples):
        raise VtpruneError(f"per-seed accuracy: {len(correct)} outcomes for {len(samples)} samples")
    by_seed: dict[int, list[bool]] = {}
    for ok, s in zip(correct, samples, strict=True):
        seed = sample_seed(s)
        if seed is not None:
            by_seed.setdefault(seed, []).append(bool(ok))
    return {str(seed): sum(v) / len(v) for seed, v in sorted(by_seed.items())}


def seed_spread(per_seed: dict[str, float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the per-seed accuracies; sd None with fewer than 2 seeds."""
    vals = list(per_seed.values())
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
