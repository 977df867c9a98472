"""`vtprune testbed recipe`: the chain's first two phases, soup rounds, decoder-only rounds after Stage C and growth,
in one resumable command with one lineage (tiny sizes, a few steps per phase and branch)."""

from __future__ import annotations

import json

import pytest
import torch

from vtprune.errors import VtpruneError
from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.card import check_lineage
from vtprune.testbed.chain_v3 import run_chain
from vtprune.testbed.recipe_v3 import CLS_LR, CLS_ROUNDS_SEED, EMA_DECAY, ROUNDS_SEED, run_recipe


def _config(folder) -> dict:
    return json.loads((folder / "train_config.json").read_text())


def test_recipe_runs_every_stage_hands_over_and_resumes(tmp_path):
    out = tmp_path / "recipe"
    logs: list[str] = []
    final = run_recipe(out, seed=3, rounds=1, cls_rounds=1, tiny=True, progress=False, log=logs.append)
    assert final == out / "final"
    # the chain stops after its tower phase: no grown or deep phase there
    assert sorted(p.name for p in (out / "chain").iterdir()) == ["small", "tower"]
    tower = out / "chain" / "tower" / "model"
    rounds = [_config(out / "rounds" / "round1" / f"branch{b}") for b in (0, 1)]
    assert [c["init"] for c in rounds] == [str(tower)] * 2
    assert [c["seed"] for c in rounds] == [3 + ROUNDS_SEED, 4 + ROUNDS_SEED]
    assert all(c["ema_decay"] == EMA_DECAY and c["tower_lr_b"] > 0 for c in rounds)
    cls = [_config(out / "cls-rounds" / "round1" / f"branch{b}") for b in (0, 1)]
    assert [c["init"] for c in cls] == [str(out / "cls-rounds" / "cls")] * 2
    assert [c["seed"] for c in cls] == [3 + CLS_ROUNDS_SEED, 4 + CLS_ROUNDS_SEED]
    assert all(c["lr_b"] == CLS_LR and c["tower_lr_b"] == 0 for c in cls)  # the decoder alone

    # the result is the last soup grown (2 -> 4 tiny layers), computing the same function
    soup, _ = resolve_model(out / "cls-rounds" / "round1" / "soup")
    grown, _ = resolve_model(final / "model")
    assert grown.config.text_config.num_hidden_layers == 2 * soup.config.text_config.num_hidden_layers
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.allclose(soup(input_ids=ids).logits, grown(input_ids=ids).logits, atol=1e-5)

    lineage = json.loads((out / "lineage.json").read_text())
    check_lineage(lineage)
    runs = [e["run"] for e in lineage]
    assert runs == [str(out / "chain" / "small"), str(out / "chain" / "tower"),
                    *(str(out / "rounds" / "round1" / n) for n in ("branch0", "branch1", "soup")),
                    *(str(out / "cls-rounds" / n) for n in ("cls", "round1/branch0", "round1/branch1", "round1/soup")),
                    str(final)]
    assert all(e["command"].startswith(f"vtprune testbed recipe --out {out} --seed 3 --rounds 1") for e in lineage)
    assert lineage[0]["steps"] > 0 and lineage[0]["seconds"] > 0 and lineage[-1]["steps"] == 0

    again: list[str] = []
    assert run_recipe(out, seed=3, rounds=1, cls_rounds=1, tiny=True, progress=False, log=again.append) == final
    assert again[:2] == ["chain: small done", "chain: tower done"] and again[-1] == "recipe: final done"
    assert json.loads((out / "lineage.json").read_text()) == lineage
    with pytest.raises(ValueError, match=r"was started with other arguments: rounds 1 \(now 2\); resume with the same"):
        run_recipe(out, seed=3, rounds=2, cls_rounds=1, tiny=True, progress=False, log=lambda *_: None)


def test_chain_until_stops_after_the_phase(tmp_path):
    with pytest.raises(ValueError, match="until 'deeper' is not a phase of the chain"):
        run_chain(tmp_path / "x", tiny=True, until="deeper")
    with pytest.raises(ValueError, match="until 'small' must come after 'tower'"):
        run_chain(tmp_path / "x", tiny=True, until="small", after="tower", from_model=str(tmp_path))
    assert not (tmp_path / "x").exists()


def test_recipe_refuses_bad_requests_before_training(tmp_path):
    from vtprune.cli import main

    with pytest.raises(ValueError, match="rounds must be >= 1"):
        run_recipe(tmp_path / "x", rounds=0, tiny=True)
    with pytest.raises(ValueError, match="cls_rounds must be >= 0"):
        run_recipe(tmp_path / "x", cls_rounds=-1, tiny=True)
    for bad in (["--rounds", "0"], ["--cls-rounds", "-1"], ["--seconds", "0"], ["--branches", "0"],
                ["--vision-init", str(tmp_path / "missing")]):
        assert main(["testbed", "recipe", "--out", str(tmp_path / "x"), "--tiny", *bad]) == 2, bad
    assert not (tmp_path / "x").exists()


def test_a_damaged_recipe_json_is_refused_in_one_line_before_training(tmp_path):
    out = tmp_path / "recipe"
    out.mkdir()
    (out / "recipe.json").write_text('{"seed": 0, "rounds": NaN}')
    with pytest.raises(VtpruneError, match=r"recipe\.json") as err:
        run_recipe(out, tiny=True, progress=False, log=lambda *_: None)
    assert "\n" not in str(err.value)
    (out / "recipe.json").write_text("[1, 2]")  # valid JSON, not an object: differs in every argument
    with pytest.raises(ValueError, match=r"was started with other arguments: seed None \(now 0\)"):
        run_recipe(out, tiny=True, progress=False, log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json"]
