"""The moving average of the weights (`weight_ema.py`, `TrainConfig.ema_decay`): the arithmetic, a copy that leaves
the model alone, and the trainer exporting it beside the final model and carrying it across a resume."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from factories import tiny_v3_train_config, train_restoring_threads
from torch import nn

from vtprune.testbed.weight_ema import WeightEMA


def test_the_average_follows_the_weights_by_the_decay_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightEMA(model, decay=0.75)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what an optimiser step does: the weights change in place
    ema.update()
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(ema.average[key], 0.75 * start[key] + 0.25 * value), key
    averaged = ema.averaged_model()
    assert averaged is not model and not averaged.training
    assert torch.allclose(averaged[0].weight, 0.75 * start["0.weight"] + 0.25 * model[0].weight)
    assert torch.equal(model[0].weight, start["0.weight"] + 1.0)  # the model itself is untouched
    assert ema.state_dict()["1.running_mean"].shape == (2,)  # float buffers are averaged too
    assert "1.num_batches_tracked" not in ema.average  # integer buffers are not averaged

    again = WeightEMA(model, decay=0.75)
    again.load_state_dict(ema.state_dict())
    assert all(torch.equal(again.average[k], ema.average[k]) for k in ema.average)
    with pytest.raises(ValueError, match="does not fit this model"):
        WeightEMA(nn.Linear(3, 3), decay=0.75).load_state_dict(ema.state_dict())
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightEMA(model, decay=bad)


def test_trainer_exports_the_average_and_carries_it_across_a_resume(tmp_path):
    from vtprune import checkpointing as cpt
    from vtprune.testbed.builtin import resolve_model
    from vtprune.testbed.train import train

    def state():
        return cpt.load_state(cpt.latest(tmp_path / "state", ""), "state", "cpu")

    cfg = tiny_v3_train_config(steps_b=3, eval_every=10, save_every=1, export_final=True, ema_decay=0.5)
    train_restoring_threads(tmp_path, replace(cfg, steps_b=2))  # interrupted after two steps
    two = state()
    assert any(not torch.equal(two["ema"][k], two["model"][k].float()) for k in two["ema"])  # an average
    train_restoring_threads(tmp_path, cfg)  # resumed: one more step
    three = state()
    for key, avg in three["ema"].items():  # the saved average went on, not restarted from the weights
        assert torch.allclose(avg, 0.5 * two["ema"][key] + 0.5 * three["model"][key].float(), atol=1e-6), key
    exported = resolve_model(tmp_path / "model_ema")[0].state_dict()
    final = resolve_model(tmp_path / "model")[0].state_dict()
    for key, avg in three["ema"].items():
        assert torch.allclose(exported[key], avg, atol=2e-3), key  # written as float16, like the final model
    assert any(not torch.equal(exported[k], final[k]) for k in final)
    for key, value in three["model"].items():  # a longer Stage B exports its own final model, not the earlier one
        assert torch.allclose(final[key], value.float(), atol=2e-3), key
    with pytest.raises(ValueError, match="ema_decay 0.5 needs export_final"):
        train(tmp_path / "bad", replace(cfg, export_final=False), progress=False, log=lambda _: None)
