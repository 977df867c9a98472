"""`vtprune testbed soup-rounds`: branches trained side by side in their own processes, the soup of the parent and
its branches, the next round from that soup, the lineage written, and a re-run that only resumes (tiny sizes)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from vtprune.testbed import data_v3
from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.card import check_lineage
from vtprune.testbed.soup_rounds import BRANCH_LR, branch_config, run_soup_rounds, tower_types
from vtprune.testbed.train import export
from vtprune.testbed.train_v3 import TINY_V3


def _save(folder, layers: int = 2, seed: int = 1, dtype: torch.dtype = torch.float32):
    model = data_v3.build_model(replace(TINY_V3, text_layers=layers), seed=seed).eval()
    export(model, data_v3.build_processor(), folder, dtype=dtype)
    return folder


def test_soup_rounds_train_branches_average_them_and_resume(tmp_path):
    init = _save(tmp_path / "init")
    out = tmp_path / "rounds"
    logs: list[str] = []
    final = run_soup_rounds(out, str(init), rounds=2, branches=2, seed=5, tiny=True, log=logs.append)
    assert final == out / "round2" / "soup"
    configs = [json.loads((out / f"round{r}" / f"branch{b}" / "train_config.json").read_text())
               for r in (1, 2) for b in (0, 1)]
    assert [c["seed"] for c in configs] == [5, 6, 7, 8]  # fresh scenes for every branch
    assert [c["init"] for c in configs] == [str(init)] * 2 + [str(out / "round1" / "soup")] * 2
    assert all(c["threads"] == 1 and c["lr_b"] == c["tower_lr_b"] == BRANCH_LR for c in configs)
    assert all(c["tower_count_target"] == "centre" and c["export_final"] for c in configs)

    # round 1's soup is the mean of the parent and its two branches, weight by weight
    parent = resolve_model(init)[0].state_dict()
    branches = [resolve_model(out / "round1" / f"branch{b}" / "model")[0].state_dict() for b in (0, 1)]
    soup = resolve_model(out / "round1" / "soup")[0].state_dict()
    assert any(not torch.equal(branches[0][k], parent[k]) for k in parent)  # the branches trained
    for k, v in soup.items():
        if v.is_floating_point():
            assert torch.allclose(v, (parent[k] + branches[0][k] + branches[1][k]) / 3, atol=1e-6), k

    lineage = json.loads((out / "lineage.json").read_text())
    assert [e["run"] for e in lineage] == [str(out / f"round{r}" / n) for r in (1, 2)
                                           for n in ("branch0", "branch1", "soup")]
    assert all(e["steps"] > 0 for e in lineage if e["run"].rsplit("/", 1)[-1].startswith("branch"))
    assert all(e["seconds"] > 0 for e in lineage if e["run"].rsplit("/", 1)[-1].startswith("branch"))
    assert all("--seed 5" in e["command"] for e in lineage)
    check_lineage(lineage)  # the form a model card's --lineage takes
    assert (out / "round1" / "branch0.log").read_text().strip()  # each branch logs to its own file

    again: list[str] = []
    assert run_soup_rounds(out, str(init), rounds=2, branches=2, seed=5, tiny=True, log=again.append) == final
    with pytest.raises(ValueError, match="peak learning rate 0.0003, not 0.001: resume with the same command"):
        run_soup_rounds(out, str(init), rounds=2, branches=2, seed=5, lr=1e-3, tiny=True, log=lambda *_: None)
    assert again == [f"soup-rounds: round {r} {w}" for r in (1, 2)
                     for w in ("branch 0 done", "branch 1 done", "soup done")]


def test_soup_rounds_with_a_weight_average_soup_the_averages(tmp_path):
    init = _save(tmp_path / "init")
    out = tmp_path / "rounds"
    final = run_soup_rounds(out, str(init), rounds=1, branches=2, seed=3, ema_decay=0.5, tiny=True,
                            log=lambda m: None)
    assert all(json.loads((out / "round1" / f"branch{b}" / "train_config.json").read_text())["ema_decay"] == 0.5
               for b in (0, 1))
    parent = resolve_model(init)[0].state_dict()
    averages = [resolve_model(out / "round1" / f"branch{b}" / "model_ema")[0].state_dict() for b in (0, 1)]
    finals = [resolve_model(out / "round1" / f"branch{b}" / "model")[0].state_dict() for b in (0, 1)]
    assert any(not torch.equal(averages[0][k], finals[0][k]) for k in parent)  # the oracle can fail
    soup = resolve_model(final)[0].state_dict()
    for k, v in soup.items():
        if v.is_floating_point():
            assert torch.allclose(v, (parent[k] + averages[0][k] + averages[1][k]) / 3, atol=1e-6), k
    assert all("--ema 0.5" in e["command"] for e in json.loads((out / "lineage.json").read_text()))
    with pytest.raises(ValueError, match="ema_decay must be in"):
        run_soup_rounds(tmp_path / "x", str(init), ema_decay=1.0, tiny=True)


def test_soup_rounds_after_stage_c_train_the_decoder_alone(tmp_path):
    """--cls-drift: Stage C first (only the [CLS] embedding moves), then branches with a frozen tower, so the soup
    keeps the tuned [CLS] embedding and the tower; the lineage starts with Stage C; a re-run only resumes. (float16,
    as the shipped models and the branches' exports: float32 weights would differ by the branches' rounding.)"""
    init = _save(tmp_path / "init", dtype=torch.float16)
    out = tmp_path / "rounds"
    final = run_soup_rounds(out, str(init), rounds=1, branches=2, seed=3, ema_decay=0.5, cls_drift=20.0, tiny=True,
                            log=lambda m: None)
    key = "model.vision_tower.embeddings.class_embedding"
    parent = resolve_model(init)[0].state_dict()
    tuned = resolve_model(out / "cls")[0].state_dict()
    assert not torch.equal(tuned[key], parent[key])  # Stage C trained the [CLS] embedding ...
    assert all(torch.equal(tuned[k], parent[k]) for k in parent if k != key)  # ... and nothing else
    configs = [json.loads((out / "round1" / f"branch{b}" / "train_config.json").read_text()) for b in (0, 1)]
    assert all(c["init"] == str(out / "cls") and c["tower_lr_b"] == 0.0 and c["lr_b"] == BRANCH_LR for c in configs)
    soup = resolve_model(final)[0].state_dict()
    tower = [k for k in parent if k.startswith("model.vision_tower.")]
    assert all(torch.allclose(soup[k], tuned[k], atol=1e-6) for k in tower)  # the tower, [CLS] included, kept
    assert any(not torch.allclose(soup[k], tuned[k]) for k in parent if k.startswith("model.language_model."))
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage[0]["run"] == str(out / "cls") and lineage[0]["steps"] == 1 and "feature-drift penalty 20" in \
        lineage[0]["what"]
    assert all("--cls-drift 20" in e["command"] for e in lineage)
    assert lineage[0]["machine"].endswith("threads 1")  # Stage C ran on one thread, as the lineage says
    check_lineage(lineage)
    again: list[str] = []
    assert run_soup_rounds(out, str(init), rounds=1, branches=2, seed=3, ema_decay=0.5, cls_drift=20.0, tiny=True,
                           log=again.append) == final
    assert again[0] == "soup-rounds: Stage C done"
    with pytest.raises(ValueError, match="made with feature-drift penalty 20, not 50"):
        run_soup_rounds(out, str(init), rounds=1, branches=2, seed=3, ema_decay=0.5, cls_drift=50.0, tiny=True)
    with pytest.raises(ValueError, match="cls_drift must be >= 0"):
        run_soup_rounds(tmp_path / "x", str(init), cls_drift=-1.0, tiny=True)


def test_branch_config_is_the_tower_phase_with_the_branch_changes():
    cfg = branch_config("some/model", seed=3, seconds=600)
    assert (cfg.init, cfg.seed, cfg.time_limit_b, cfg.threads, cfg.bf16) == ("some/model", 3, 600.0, 1, False)
    assert cfg.centre_spread > 0 and cfg.size.text_layers == 4
    assert cfg.type_schedule.count("count") == 4 == tower_types(4).count("count")
    assert cfg.lr_b == cfg.tower_lr_b == BRANCH_LR
    slow = branch_config("some/model", seed=3, lr=1e-4, frozen_tower=True)
    assert (slow.lr_b, slow.tower_lr_b) == (1e-4, 0.0)
    with pytest.raises(ValueError, match="count_times must be >= 1"):
        tower_types(0)


def test_soup_rounds_refuse_bad_requests_before_training(tmp_path):
    from vtprune.cli import main

    init = _save(tmp_path / "init")
    deep = _save(tmp_path / "deep", layers=3)
    with pytest.raises(ValueError, match="has 3 decoder layers; soup rounds continue a 2-layer"):
        run_soup_rounds(tmp_path / "x", str(deep), tiny=True)
    with pytest.raises(ValueError, match="rounds and branches must be >= 1"):
        run_soup_rounds(tmp_path / "x", str(init), rounds=0, tiny=True)
    with pytest.raises(ValueError, match="is not a model directory"):
        run_soup_rounds(tmp_path / "x", str(tmp_path / "missing"), tiny=True)
    with pytest.raises(ValueError, match="lr must be > 0"):
        run_soup_rounds(tmp_path / "x", str(init), lr=0.0, tiny=True)
    for bad in (["--init", str(tmp_path / "missing")], ["--init", "tiny:llava"],
                ["--init", str(init), "--seconds", "0"], ["--init", str(init), "--rounds", "0"],
                ["--init", str(init), "--ema", "1"], ["--init", str(init), "--cls-drift", "-1"],
                ["--init", str(init), "--lr", "-1e-4"]):
        assert main(["testbed", "soup-rounds", "--out", str(tmp_path / "x"), *bad]) == 2, bad
    assert not (tmp_path / "x").exists()
