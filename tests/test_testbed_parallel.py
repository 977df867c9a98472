"""Data-parallel training (`TrainConfig.procs`, testbed/parallel.py and parallel_launch.py): two processes
sharing each step's batch end with the weights of one process that sees the whole batch (gradients averaged,
Stage-B losses weighted by answer tokens), and only rank 0 writes checkpoints."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vtprune import checkpointing as cpt
from vtprune.testbed import data_v3
from vtprune.testbed.parallel_launch import train_parallel
from vtprune.testbed.train import train
from vtprune.testbed.train_v3 import TINY_V3, v3_config


def _config(**kw):
    cfg = replace(v3_config(size=TINY_V3), steps_a=0, steps_b=3, batch_b=2, questions_per_image=3, warmup=1,
                  eval_every=100, eval_per_type=1, save_every=1, keep_schedule="", type_schedule="",
                  probe_scenes=4, feature_cache=6, cls_steps=0, single_steps=2, single_batch=4, bf16=False)
    return replace(cfg, **kw)


def _final_weights(out) -> dict[str, torch.Tensor]:
    return cpt.load_state(cpt.latest(out / "state", ""), "state", "cpu")["model"]


# the tower trained in Stage B too (tower_lr_b): its answer-loss gradients are averaged like the decoder's. Stage A's
# dense losses are per-process means (like Stage A's own), so their average is the batch's only up to the weighting
# of unequal class counts: left out here (weight 0), where the weights must match exactly.
TOWER = {"tower_lr_b": 1e-3, "tower_dense_weight": 0.0, "feature_cache": 0, "head_fit_steps": 2, "batch_a": 2}


@pytest.mark.parametrize("extra", [{}, TOWER], ids=["frozen-tower", "trained-tower"])
def test_two_processes_train_the_single_process_weights(tmp_path, extra):
    threads = torch.get_num_threads()
    try:
        train(tmp_path / "one", _config(**extra), progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    train_parallel(tmp_path / "two", _config(procs=2, **extra))
    one, two = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    # Adam turns a gradient that is zero up to float summation order into a full +-lr step, so a few weights may
    # differ by up to lr per step; every other weight must match (without the all-reduce most of them differ).
    a = torch.cat([one[k].reshape(-1).float() for k in sorted(one)])
    b = torch.cat([two[k].reshape(-1).float() for k in sorted(one)])
    off = (a - b).abs() > 1e-5 + 1e-4 * a.abs()
    print(f"weights off: {int(off.sum())} of {off.numel()}, largest {float((a - b).abs().max()):.2e}")
    assert off.float().mean() < 1e-3
    assert float((a - b).abs().max()) <= 3 * _config().lr_b
    fresh = data_v3.build_model(TINY_V3, seed=0).state_dict()  # Stage B did move the decoder
    assert any(not torch.equal(one[k], fresh[k]) for k in one if "language_model.layers" in k)
    if extra:  # ... and the tower
        assert any(not torch.equal(one[k], fresh[k]) for k in one if "vision_tower" in k)
    st = cpt.load_state(cpt.latest(tmp_path / "two" / "state", ""), "state", "cpu")["st"]
    assert int(st["step"]) == 3 and int(st["scenes_b"]) == 4 + 4 + 2
    assert (tmp_path / "two" / "model").exists() and (tmp_path / "two" / "train_summary.json").exists()


def test_procs_must_match_the_process_group_and_divide_the_batches(tmp_path):
    with pytest.raises(ValueError, match="procs=2 but this process group has 1"):
        train(tmp_path, _config(procs=2), progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="needs procs >= 2"):
        train_parallel(tmp_path, _config())
    with pytest.raises(ValueError, match="single_batch=3 is not divisible by procs=2"):
        train_parallel(tmp_path, _config(procs=2, single_batch=3))
