"""Issue 20: property-based tests of the API contract with `hypothesis`.

For generated budgets (ints, floats, numpy scalars, bools, strings, edge values), option values and batch mixes
(left padding of different lengths, 0, 1 or 2 images per prompt), `vtprune.apply` + a forward either
- is refused with the documented error (`BudgetError` / `VtpruneError`) and the model is untouched (no hook
  left, logits bit-exact), or
- runs, and its last-token logits equal the independent masking reference (`tests/oracles.py`) for the kept
  sets it recorded; after `remove` the model is bit-exact again.
Example counts are modest for the default suite (see `EXAMPLES`).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from factories import tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import masked_reference_logits

import vtprune
from vtprune.errors import BudgetError, VtpruneError

#: hypothesis examples per test in the default suite; VTPRUNE_HYPOTHESIS_SCALE=10 runs ten times as many
SCALE = int(os.environ.get("VTPRUNE_HYPOTHESIS_SCALE", "1"))
EXAMPLES = {k: v * SCALE for k, v in {"budgets": 40, "options": 30, "batches": 25, "sizes": 15}.items()}
N_PER_IMAGE = 16  # 56 px images, patch 14
LAYERS = 4


def _settings(name: str):
    return settings(
        max_examples=EXAMPLES[name], deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )


@pytest.fixture(scope="module")
def model():
    return tiny("llava", layers=LAYERS, image_size=56)


def _inputs(model, samples: list[tuple[int, int, int]], seed: int) -> dict:
    """Left-padded batch; samples: (prefix length, suffix length, images) per prompt."""
    gen = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    rows = []
    for pre, post, n_img in samples:
        text = torch.randint(3, 200, (pre + post,), generator=gen).tolist()
        rows.append(text[:pre] + [image_id] * (N_PER_IMAGE * n_img) + text[pre:])
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    n_images = sum(s[2] for s in samples)
    if n_images:
        out["pixel_values"] = torch.randn(n_images, 3, 56, 56, generator=gen)
    return out


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _check(model, inputs, method: str, budget, options: dict, expect_valid: bool | None) -> None:
    """The contract for one call (see the module docstring)."""
    stock, hooks = _logits(model, inputs), _hooks(model)
    try:
        vtprune.apply(model, method, budget, **options)
    except VtpruneError as err:
        assert "\n" not in str(err)
        assert expect_valid is not True, f"refused a valid call: {err}"
        assert vtprune.session_of(model) is None and _hooks(model) == hooks
        assert torch.equal(_logits(model, inputs), stock)
        return
    try:
        assert expect_valid is not False, f"accepted an invalid call: {method} {budget!r} {options}"
        try:
            pruned = _logits(model, inputs)[:, -1]
        except BudgetError as err:  # documented refusals that depend on the prompt, so only a forward can tell
            if "cannot keep one token of each of the" in str(err):  # fewer tokens than images in one prompt
                assert isinstance(budget, int) and budget < 2  # only a prompt with two images and budget 1
            else:  # a layer-averaged budget split over several images, infeasible for an in-LLM cut
                assert expect_valid is None and "is infeasible for a cut at layer" in str(err), str(err)
            pruned = None
        record = vtprune.last_run(model)
    finally:
        vtprune.remove(model)
    if pruned is None:
        assert _hooks(model) == hooks and torch.equal(_logits(model, inputs), stock)
        return
    assert _hooks(model) == hooks and torch.equal(_logits(model, inputs), stock)
    if "pixel_values" in inputs:
        ref = masked_reference_logits(model, inputs, record)[:, -1]
    else:  # no image anywhere: the stock model's output, bit-exactly
        ref = stock[:, -1]
        assert torch.equal(pruned, ref)
    assert (pruned - ref).abs().max() <= 1e-4
    for b, sample in enumerate(record.samples):
        n_vis = int((inputs["input_ids"][b] == model.config.image_token_id).sum())
        assert sample.n_visual == n_vis
        for ev in sample.events:
            assert torch.equal(ev.keep_idx, ev.keep_idx.unique())
            assert ev.keep_idx.numel() == 0 or int(ev.keep_idx.max()) < n_vis


# --- budgets ------------------------------------------------------------------------------------------------
def _valid_budget(value) -> bool:
    """The documented rule: an int (Python/numpy) >= 1 is a count; a float (Python/numpy) in (0, 1) a ratio."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return int(value) >= 1
    if isinstance(value, (float, np.floating)):
        return math.isfinite(float(value)) and 0.0 < float(value) < 1.0
    return False


BUDGETS = st.one_of(
    st.integers(-3, 40),
    st.floats(-0.5, 2.5),
    st.sampled_from([0, 1, 0.0, 1.0, 2.0, 1e-9, 1 - 1e-12, math.nan, math.inf, -math.inf, True, False]),
    st.integers(-2, 40).map(np.int64),
    st.integers(1, 40).map(np.int32),
    st.floats(0.0, 1.5, width=32).map(np.float32),
    st.sampled_from(["8", None, [8], b"8"]),
)


@_settings("budgets")
@given(budget=BUDGETS, method=st.sampled_from(["random", "fastv"]))
def test_budget_contract(model, budget, method):
    inputs = _inputs(model, [(2, 4, 1), (1, 6, 1)], seed=0)
    options = {"budget_mode": "retained"} if method == "fastv" else {}
    _check(model, inputs, method, budget, options, _valid_budget(budget))
    if not _valid_budget(budget):
        with pytest.raises(BudgetError):
            vtprune.apply(model, method, budget, **options)


# --- option values --------------------------------------------------------------------------------------------
OPTION_VALUES = st.one_of(
    st.integers(-2, 6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
    st.integers(-1, 5).map(np.int64),
)


@_settings("options")
@given(k=OPTION_VALUES, criterion=st.sampled_from(["last_token", "mean_received", "first", 3]))
def test_fastv_option_contract(model, k, criterion):
    inputs = _inputs(model, [(2, 4, 1), (1, 3, 1)], seed=1)
    valid_k = isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 1 <= int(k) < LAYERS
    valid = valid_k and criterion in ("last_token", "mean_received")
    _check(model, inputs, "fastv", 8, {"budget_mode": "retained", "k": k, "criterion": criterion}, valid)


@_settings("options")
@given(seed=OPTION_VALUES, layer=st.one_of(st.none(), OPTION_VALUES))
def test_random_option_contract(model, seed, layer):
    inputs = _inputs(model, [(1, 3, 1)], seed=2)
    valid_seed = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
    valid_layer = layer is None or (
        isinstance(layer, (int, np.integer)) and not isinstance(layer, bool) and 1 <= int(layer) < LAYERS
    )
    options = {"seed": seed, "layer": layer, "budget_mode": "retained"}
    _check(model, inputs, "random", 8, options, valid_seed and valid_layer)


# --- batch mixes ----------------------------------------------------------------------------------------------
SAMPLE = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(0, 2))


@_settings("batches")
@given(
    samples=st.lists(SAMPLE, min_size=1, max_size=3),
    case=st.sampled_from(
        [("random", {}), ("random", {"layer": 2}), ("fastv", {"budget_mode": "retained"}), ("fastv", {"k": 1})]
    ),
    budget=st.one_of(st.integers(1, 40), st.sampled_from([0.25, 0.5, 0.9])),
    seed=st.integers(0, 3),
)
def test_batch_mix_contract(model, samples, case, budget, seed):
    """Padding of several lengths, prompts without an image or with two: runs and equals the reference (or a
    documented refusal: a layer-averaged budget infeasible for the cut)."""
    method, options = case
    inputs = _inputs(model, samples, seed)
    _check(model, inputs, method, budget, dict(options), True if not options else None)


# --- image sizes (dynamic resolution) ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen():
    return tiny("qwen2_5_vl", layers=LAYERS)


@_settings("sizes")
@given(
    sizes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=2),
    case=st.sampled_from([("random", {}), ("fastv", {"budget_mode": "retained"})]),
    budget=st.one_of(st.integers(1, 20), st.sampled_from([0.3, 0.5])),
)
def test_image_size_contract(qwen, sizes, case, budget):
    """Qwen2.5-VL images of (28·h) × (28·w) px, one per prompt, left-padded batch: equals the reference."""
    from vtprune.testing import qwen_inputs

    method, options = case
    prompts = [([1, 5, 6][: 1 + b], [7, 8, 9]) for b in range(len(sizes))]
    inputs = qwen_inputs(qwen, prompts, [(28 * h, 28 * w) for h, w in sizes], seed=len(sizes))
    _check(qwen, inputs, method, budget, dict(options), True)
