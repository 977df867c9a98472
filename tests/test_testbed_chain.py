"""`vtprune testbed chain`: the v3 training chain in one resumable command (tiny sizes, a few steps per phase)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from vtprune import checkpointing as cpt
from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.chain_v3 import (
    CLS_DRIFT_WEIGHT,
    DEEP_STEPS,
    PHASE_SECONDS,
    TOWER_LR,
    TOWER_STEPS,
    layer_image,
    phases,
    run_chain,
)
from vtprune.testbed.grow import growth_plan
from vtprune.testbed.train import train


def _config(folder) -> dict:
    return json.loads((folder / "train_config.json").read_text())


def test_chain_runs_every_phase_hands_over_and_resumes(tmp_path):
    logs: list[str] = []
    final = run_chain(tmp_path, tiny=True, progress=False, log=logs.append)
    assert final == tmp_path / "deep" / "model"
    for name in ("small", "tower", "grown", "deep"):
        assert (tmp_path / name / "PHASE_DONE").exists()
    small, tower, deep = (_config(tmp_path / n) for n in ("small", "tower", "deep"))
    assert small["export_final"] and small["steps_a"] > 0 and small["tower_lr_b"] == 0
    assert tower["init"] == str(tmp_path / "small" / "model") and tower["tower_lr_b"] > 0
    assert tower["feature_cache"] == 0 and tower["steps_a"] == 0 and tower["column_code_scale"] == 0
    assert deep["init"] == str(tmp_path / "grown") and deep["tower_lr_b"] == 0
    assert (deep["size"]["text_layers"], small["size"]["text_layers"]) == (4, 2)
    assert resolve_model(str(final))[0].config.text_config.num_hidden_layers == 4
    # the name targets' fetch (layer 1 of 2) and relay (layer 2) in every phase, at their images after growth
    assert [(c["fetch_attention_layer"], c["fetch_relay_layer"], c["fetch_layer"]) for c in (small, tower, deep)] == [
        (1, 2, 2), (1, 2, 2), (1, 3, 4)]
    assert all(c["fetch_attention_at"] == "name" and c["fetch_attention_weight"] > 0 for c in (small, tower, deep))
    assert small["anneal_by_time"] and tower["anneal_by_time"] and deep["anneal_by_time"]
    # Stage C runs on the grown model before the deep Stage B, whose decoder then adapts to it
    assert deep["cls_before_b"] and deep["cls_steps"] > 0 and tower["cls_steps"] == small["cls_steps"] == 0
    assert deep["cls_drift_weight"] == CLS_DRIFT_WEIGHT > 0  # Stage C keeps the features close
    stages = [h["stage"] for h in json.loads((tmp_path / "deep" / "train_summary.json").read_text())["history"]]
    assert stages.count("C") == 1 and stages.index("C") < stages.index("B-eval")

    again: list[str] = []
    assert run_chain(tmp_path, tiny=True, progress=False, log=again.append) == final
    assert again == [f"chain: {n} done" for n in ("small", "tower", "grown", "deep")]


def test_grown_phase_computes_the_tower_phase_function(tmp_path):
    run_chain(tmp_path, tiny=True, progress=False, log=lambda m: None)
    tower, _ = resolve_model(str(tmp_path / "tower" / "model"))
    grown, _ = resolve_model(str(tmp_path / "grown"))
    assert grown.config.text_config.num_hidden_layers == 2 * tower.config.text_config.num_hidden_layers
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        a = tower(input_ids=ids).logits
        b = grown(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_vision_init_replaces_stage_a_and_time_scale_scales_the_limits(tmp_path):
    small = phases(vision_init="/some/tower", time_scale=0.5)[0].config("")
    assert small.steps_a == 0 and small.vision_init == "/some/tower"
    assert small.time_limit_b == PHASE_SECONDS["small"] * 0.5 and small.size.text_layers == 4
    tower = phases()[1].config("/prev/model")
    deep = phases()[3].config("/prev/grown")
    # the tower phase, where the chain gains most, has the longest limit; its step cap is not what ends it
    assert tower.time_limit_b == max(PHASE_SECONDS.values()) and tower.steps_b == TOWER_STEPS
    assert tower.lr_b == tower.tower_lr_b == TOWER_LR and deep.lr_b < TOWER_LR and deep.tower_lr_b == 0.0
    assert deep.time_limit_b == PHASE_SECONDS["deep"] and deep.steps_b == DEEP_STEPS
    assert (tower.size.text_layers, tower.fetch_layer, deep.size.text_layers, deep.fetch_layer) == (4, 3, 32, 24)
    # every attention target sits on the grown image of its small-decoder layer (growth "spread": s -> 8 (s - 1) + 1)
    for cfg, (fetch, relay, count) in ((small, (2, 3, 3)), (tower, (2, 3, 3)), (deep, (9, 17, 17))):
        assert (cfg.fetch_attention_layer, cfg.fetch_relay_layer, cfg.count_attention_layer) == (fetch, relay, count)
        assert cfg.fetch_attention_at == "name" and cfg.fetch_attention_weight > 0 and cfg.count_attention_weight > 0


@pytest.mark.parametrize("source_layers,layers", [(4, 32), (2, 4), (3, 12), (1, 5)])
def test_layer_image_is_where_growth_puts_the_trained_layer(source_layers, layers):
    trained = [i + 1 for i, (_, is_trained) in enumerate(growth_plan(source_layers, layers)) if is_trained]
    assert [layer_image(s, source_layers, layers) for s in range(1, source_layers + 1)] == trained


def test_export_final_hands_over_the_last_state_and_a_time_limit_ends_the_run(tmp_path):
    cfg = replace(phases(tiny=True)[0].config(""), steps_b=50, time_limit_b=1e-9, eval_every=1000)
    train(tmp_path, cfg, progress=False, log=lambda m: None)
    state = cpt.load_state(cpt.latest(tmp_path / "state", ""), "state")
    assert state["st"]["stage"] == "done" and state["st"]["time_up"] and state["st"]["step"] < 50
    exported, _ = resolve_model(str(tmp_path / "model"))
    for name, value in exported.state_dict().items():
        assert torch.equal(value, state["model"][name].to(torch.float16).to(value.dtype)), name  # exported fp16
    logs: list[str] = []
    train(tmp_path, cfg, progress=False, log=logs.append)  # a finished phase stays finished
    assert cpt.load_state(cpt.latest(tmp_path / "state", ""), "state")["st"]["step"] == state["st"]["step"]


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_cli_refuses_a_non_positive_time_scale(tmp_path, bad, capsys):
    from vtprune.cli import main

    assert main(["testbed", "chain", "--out", str(tmp_path / "c"), "--tiny", "--time-scale", bad]) == 2
    assert "--time-scale must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_cli_chain_defaults_to_two_threads_the_limits_are_set_for():
    from vtprune.cli import build_parser

    args = build_parser().parse_args(["testbed", "chain", "--out", "x"])
    assert args.threads == 2 and args.time_scale == 1.0


def test_chain_can_start_after_a_phase_from_a_given_model(tmp_path):
    """`after="tower", from_model=M`: M is grown and the deep phase runs on it, as if the tower phase had made it
    (how `shapes-v3-u15-deep` was made from a continuation of the chain's tower phase)."""
    run_chain(tmp_path / "full", tiny=True, progress=False, log=lambda m: None)
    model = tmp_path / "full" / "tower" / "model"
    logs: list[str] = []
    final = run_chain(tmp_path / "late", tiny=True, progress=False, after="tower", from_model=str(model),
                      log=logs.append)
    assert final == tmp_path / "late" / "deep" / "model"
    assert sorted(p.name for p in (tmp_path / "late").iterdir()) == ["deep", "grown"]
    assert logs[0] == f"chain: starting after tower from {model}"
    assert _config(tmp_path / "late" / "deep")["init"] == str(tmp_path / "late" / "grown")
    full, _ = resolve_model(str(tmp_path / "full" / "grown"))
    late, _ = resolve_model(str(tmp_path / "late" / "grown"))
    for name, value in full.state_dict().items():  # the same model grown the same way
        assert torch.equal(value, late.state_dict()[name]), name
    with pytest.raises(ValueError, match="after 'deep' is not a phase the chain can start after"):
        run_chain(tmp_path / "x", tiny=True, after="deep", from_model=str(model))
    with pytest.raises(ValueError, match="after and from_model go together"):
        run_chain(tmp_path / "x", tiny=True, after="tower")
    with pytest.raises(ValueError, match="is not a model directory"):
        run_chain(tmp_path / "x", tiny=True, after="tower", from_model=str(tmp_path / "nothing"))
    assert not (tmp_path / "x").exists()


def test_cli_refuses_after_without_a_model_directory(tmp_path, capsys):
    from vtprune.cli import main

    assert main(["testbed", "chain", "--out", str(tmp_path / "c"), "--tiny", "--after", "tower"]) == 2
    assert "--after and --from-model go together" in capsys.readouterr().err
    assert main(["testbed", "chain", "--out", str(tmp_path / "c"), "--tiny", "--after", "tower", "--from-model",
                 str(tmp_path / "missing")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
