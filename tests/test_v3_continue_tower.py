"""benchmarks/v3_continue_tower.py: the chain's tower phase with the named changes and nothing else."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from vtprune.testbed import chain_v3

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "v3_continue_tower.py"


def _load():
    spec = importlib.util.spec_from_file_location("v3_continue_tower", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_count_times_two_is_the_chains_type_list():
    assert _load().tower_types(2) == chain_v3.TOWER_TYPES
    assert _load().tower_types(4).count("count") == 4


def test_the_config_differs_from_the_chains_tower_phase_only_where_asked(monkeypatch):
    module = _load()
    seen = []
    monkeypatch.setattr(module, "train", lambda out, cfg, **kw: seen.append(cfg))
    module.main(["OUT", "--init", "M", "--centre", "--count-times", "4", "--heads", "4:0,4:1", "--steps", "100"])
    chain = {p.name: p for p in chain_v3.phases()}["tower"].config("M")
    want = replace(chain, lr_b=3e-4, tower_lr_b=3e-4, type_schedule=module.tower_types(4), time_limit_b=4800.0,
                   threads=1, bf16=False, count_attention_heads="4:0,4:1", steps_b=100, tower_count_target="centre")
    assert seen == [want]
    with pytest.raises(SystemExit):
        module.main(["OUT", "--init", "M", "--count-times", "0"])
    with pytest.raises(SystemExit):
        module.main(["OUT", "--init", "M", "--count-weight", "0"])


def test_count_weight_and_seed_reach_the_config(monkeypatch):
    module = _load()
    seen = []
    monkeypatch.setattr(module, "train", lambda out, cfg, **kw: seen.append(cfg))
    module.main(["OUT", "--init", "M", "--count-weight", "4", "--seed", "2", "--spread", "7"])
    assert seen[0].count_attention_weight == 4.0 and seen[0].seed == 2 and seen[0].centre_spread == 7.0
    assert seen[0].count_sink_weight == chain_v3.COUNT_SINK_WEIGHT
    assert (seen[0].count_attention_at, seen[0].count_attention_layer) == ("answer", chain_v3.COUNT_ATTENTION_LAYER)
    module.main(["OUT", "--init", "M", "--count-at", "name"])
    assert seen[1].count_attention_at == "name" and seen[1].fetch_attention_at == "name"
    assert seen[1].count_attention_layer == chain_v3.FETCH_ATTENTION_LAYER < seen[1].fetch_relay_layer
    assert seen[0].count_mark == seen[1].count_mark == "centre"
    module.main(["OUT", "--init", "M", "--mark", "centre+top+left", "--heads", "4:0,4:1"])
    assert seen[2].count_mark == "centre+top+left" and seen[2].count_attention_heads == "4:0,4:1"


def test_soup_rounds_branches_are_the_manual_continuations(monkeypatch):
    """`vtprune testbed soup-rounds` trains each branch as the twenty-fourth session's u28-u33 were trained."""
    from vtprune.testbed.soup_rounds import branch_config

    module = _load()
    seen = []
    monkeypatch.setattr(module, "train", lambda out, cfg, **kw: seen.append(cfg))
    module.main(["OUT", "--init", "M", "--centre", "--count-times", "4", "--spread", "7", "--seconds", "2400",
                 "--seed", "14"])
    assert seen == [branch_config("M", seed=14, seconds=2400)]
