"""Stage B that trains the vision tower too (`TrainConfig.tower_lr_b`): the dense targets packed batches carry are
Stage A's, the tower changes only when asked, the heads are fitted first when the run has no Stage A, the run
resumes with its optimiser, and the combinations that cannot work are refused up front."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from vtprune.testbed import data_v3
from vtprune.testbed.data import Packing
from vtprune.testbed.splits import train_split


def test_packed_batches_carry_stage_a_targets_of_the_same_scenes():
    split = train_split(3)
    pv, dense = data_v3.dense_batch(split, 4, 2)
    batch = data_v3.question_batch(split, 4, 2, Packing(3), with_dense=True)
    assert torch.equal(batch["pixel_values"], pv)
    for k in ("colour", "shape", "digit", "xy"):
        assert torch.equal(batch[f"dense_{k}"], dense[k]), k
    assert (batch["dense_colour"] > 0).any() and (batch["dense_digit"] > 0).any()
    assert not any(k.startswith("dense_") for k in data_v3.question_batch(split, 4, 1, Packing(3)))


def _cfg(**kw):
    from vtprune.testbed.train_v3 import TINY_V3, v3_config

    base = dict(steps_a=0, batch_a=2, steps_b=2, batch_b=2, questions_per_image=3, warmup=1, eval_every=10,
                eval_per_type=1, save_every=1, keep_schedule="", probe_scenes=4, feature_cache=0, cls_steps=0,
                single_steps=0, type_schedule="", fetch_weight=0.0)
    return replace(v3_config(size=TINY_V3), **(base | kw))


def _tower(state: dict) -> dict:
    return {k: v for k, v in state["model"].items() if "vision_tower" in k}


def _run(out, cfg, logs=None):
    from vtprune.testbed.train import train

    threads = torch.get_num_threads()
    try:
        train(out, cfg, progress=False, log=(logs.append if logs is not None else lambda _: None))
    finally:
        torch.set_num_threads(threads)


def test_tower_trains_only_when_asked_and_resumes(tmp_path):
    from vtprune import checkpointing as cpt

    frozen, tuned = tmp_path / "frozen", tmp_path / "tuned"
    _run(frozen, _cfg())
    logs: list[str] = []
    _run(tuned, _cfg(tower_lr_b=1e-3, head_fit_steps=2), logs)
    first_frozen = cpt.load_state(cpt.latest(frozen / "state", ""), "state", "cpu")
    first_tuned = cpt.load_state(cpt.latest(tuned / "state", ""), "state", "cpu")
    a, b = _tower(first_frozen), _tower(first_tuned)
    assert a.keys() == b.keys() and a  # same start (same seed, no Stage A), so any difference is the training
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert any("heads fitted on the frozen tower for 2 steps" in line for line in logs)
    assert int(first_tuned["opt_tower"]["state"][0]["step"]) == 2
    _run(tuned, _cfg(tower_lr_b=1e-3, head_fit_steps=2, steps_b=3))
    again = cpt.load_state(cpt.latest(tuned / "state", ""), "state", "cpu")
    assert int(again["opt_tower"]["state"][0]["step"]) == 3  # resumed its optimiser (fresh: 1), no second head fit
    assert any(not torch.equal(b[k], _tower(again)[k]) for k in b)
    assert sum(h["stage"] == "heads" for h in again["st"]["history"]) == 1


def test_frozen_tower_stays_bit_identical(tmp_path):
    from vtprune import checkpointing as cpt
    from vtprune.testbed.data_v3 import build_model
    from vtprune.testbed.train_v3 import TINY_V3

    _run(tmp_path, _cfg())
    state = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")
    cfg = _cfg()
    torch.manual_seed(cfg.seed)
    fresh = build_model(TINY_V3, cfg.seed).state_dict()
    for k, v in _tower(state).items():
        assert torch.equal(v, fresh[k]), k


def test_impossible_combinations_are_refused(tmp_path):
    with pytest.raises(ValueError, match="features cannot be cached: set feature_cache 0"):
        _run(tmp_path / "cache", _cfg(tower_lr_b=1e-3, feature_cache=4))
    with pytest.raises(ValueError, match="tower_lr_b > 0 needs shapes-v3 data"):
        _run(tmp_path / "v2", _cfg(tower_lr_b=1e-3, data="shapes-v2"))


def test_tower_share_regression_trains_its_head_and_needs_the_tower_to_train(tmp_path):
    from vtprune import checkpointing as cpt

    _run(tmp_path, _cfg(tower_lr_b=1e-3, head_fit_steps=1, tower_share_weight=1.0))
    state = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")
    assert int(state["opt_tower_share"]["state"][0]["step"]) == 2
    with pytest.raises(ValueError, match="tower_share_weight > 0 .* needs tower_lr_b > 0"):
        _run(tmp_path / "frozen", _cfg(tower_share_weight=1.0))


def test_object_centres_decompose_every_count_one_patch_per_object():
    from vtprune.testbed.questions_v3 import PLURAL, candidates
    from vtprune.testbed.scenes import COLOURS, SHAPES
    from vtprune.testbed.scenes_v3 import object_centres

    split = train_split(3)
    for index in range(6):
        scene = split.scene(index)
        centre = object_centres(scene)  # [576, C + S]
        assert centre.shape == (576, len(COLOURS) + len(SHAPES))
        # every object counted once in its colour column and once in its shape column
        assert centre[:, : len(COLOURS)].sum() == centre[:, len(COLOURS):].sum() == len(scene.objects)
        for q in candidates(scene, "count"):  # "how many red objects are there ?" / "how many circles are there ?"
            word = q.text.split()[2]
            shape = {plural: name for name, plural in PLURAL.items()}.get(q.text.split()[2])
            col = list(COLOURS).index(word) if word in COLOURS else len(COLOURS) + SHAPES.index(shape)
            assert int(centre[:, col].sum()) == int(q.answer), q.text


def test_centre_loss_is_low_only_for_the_right_patches():
    from vtprune.testbed.count_readout import tower_count_loss

    goal = torch.zeros(1, 576, 10)
    goal[0, 17, 2] = goal[0, 17, 7] = 1.0  # one object: colour 2, shape 1, centre in patch 17
    right = torch.where(goal > 0, 16.0, -16.0)
    wrong = torch.where(goal.roll(1, dims=1) > 0, 16.0, -16.0)  # the same object one patch off
    loss_right, err_right = tower_count_loss("centre", right, {"centre": goal})
    loss_wrong, err_wrong = tower_count_loss("centre", wrong, {"centre": goal})
    assert loss_right < 0.01 < 1.0 < loss_wrong
    assert err_right < 0.01 and err_wrong < 0.01  # the count is right either way; the loss tells where
    with pytest.raises(ValueError, match="tower count target 'area' is unknown; accepted: share, centre"):
        tower_count_loss("area", right, {"centre": goal})


def test_centre_sum_term_charges_the_count_neighbours_imply():
    """The summed-count term adds nothing when the patches' probabilities sum to the counts, and charges two patches
    that each claim one object's centre (the per-patch loss charges each claim only by its own miss); its gradient
    lowers both claims."""
    from vtprune.testbed.count_readout import tower_count_loss

    goal = torch.zeros(1, 576, 10)
    goal[0, 17, 2] = 1.0  # one object of colour 2, centre in patch 17
    split = torch.full((1, 576, 10), -30.0)
    split[0, 17, 2] = split[0, 18, 2] = 0.0  # 0.5 + 0.5: the count is right
    double = split.clone()
    double[0, 17, 2] = double[0, 18, 2] = 2.0  # 0.88 + 0.88: the count says 1.76
    base_split, _ = tower_count_loss("centre", split, {"centre": goal})
    with_split, _ = tower_count_loss("centre", split, {"centre": goal}, sum_weight=1.0)
    assert abs(with_split.item() - base_split.item()) < 1e-6
    double.requires_grad_(True)
    base, _ = tower_count_loss("centre", double, {"centre": goal})
    summed, err = tower_count_loss("centre", double, {"centre": goal}, sum_weight=1.0)
    assert abs(err - 0.076) < 0.005  # |1.76 - 1| in one of the ten channels, averaged over the ten
    assert summed.item() - base.item() > 0.05  # 0.76 ** 2 / 10 channels
    (summed - base).backward()
    assert double.grad[0, 17, 2] > 0 and double.grad[0, 18, 2] > 0  # descent lowers both claims


def test_tower_centre_target_trains_the_head(tmp_path):
    from vtprune import checkpointing as cpt

    _run(tmp_path, _cfg(tower_lr_b=1e-3, head_fit_steps=1, tower_share_weight=1.0, tower_count_target="centre",
                        centre_sum_weight=1.0))  # with the summed-count term
    state = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")
    assert int(state["opt_tower_share"]["state"][0]["step"]) == 2
    with pytest.raises(ValueError, match="tower_count_target 'area' is unknown"):
        _run(tmp_path / "bad", _cfg(tower_lr_b=1e-3, tower_count_target="area"))


def test_digit_place_labels_are_the_digit_with_its_place():
    from vtprune.testbed.scenes_v3 import patch_labels

    split = train_split(3)
    for index in range(4):
        scene = split.scene(index)
        lab = patch_labels(scene)
        digit, place = lab["digit"].reshape(-1), lab["place"].reshape(-1)
        assert np.array_equal(place > 0, digit > 0)
        assert np.array_equal((place[place > 0] - 1) % 10 + 1, digit[digit > 0])  # the same digit
        tens, units = (int(c) for c in str(scene.number))
        cols = np.nonzero(place.reshape(24, 24))[1]
        tens_cols, unit_cols = cols[place[place > 0] <= 10], cols[place[place > 0] > 10]
        assert set(place[(place > 0) & (place <= 10)] - 1) <= {tens} and set(place[place > 10] - 11) <= {units}
        assert len(unit_cols) and len(tens_cols) and tens_cols.min() <= unit_cols.min()  # tens start further left


def test_tower_place_target_trains_its_head(tmp_path):
    from vtprune import checkpointing as cpt

    _run(tmp_path, _cfg(tower_lr_b=1e-3, head_fit_steps=1, tower_place_weight=1.0))
    state = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")
    assert int(state["opt_tower_share"]["state"][2]["step"]) == 2 and state["st"]["place_fitted"]  # [2]: the place head
    with pytest.raises(ValueError, match="tower_place_weight > 0 .* needs tower_lr_b > 0"):
        _run(tmp_path / "frozen", _cfg(tower_place_weight=1.0))


def test_export_latest_writes_the_newest_state_not_the_best_model(tmp_path):
    from vtprune import checkpointing as cpt
    from vtprune.testbed.builtin import resolve_model
    from vtprune.testbed.train import export_latest

    _run(tmp_path / "run", _cfg(steps_b=3))
    state = cpt.load_state(cpt.latest(tmp_path / "run" / "state", ""), "state", "cpu")
    assert export_latest(tmp_path / "run", tmp_path / "latest") == (int(state["st"]["step"]), str(state["st"]["stage"]))
    model, _ = resolve_model(str(tmp_path / "latest"))
    for k, v in model.state_dict().items():  # exported in float16
        assert torch.equal(v.half(), state["model"][k].half()), k
    with pytest.raises(FileExistsError, match="already exists"):
        export_latest(tmp_path / "run", tmp_path / "latest")
    with pytest.raises(FileNotFoundError, match="is not a training run"):
        export_latest(tmp_path / "latest", tmp_path / "again")
