"""RCP ablations that say where a trained checkpoint gains or loses (`rcp.ablations.pruners_opened`,
`score_term_off`) and their driver `benchmarks/rcp_where_v3.py`, end to end on a tiny v3 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import tiny_testbed_size

from scripts import benchmark_script
from vtprune.rcp import ablations
from vtprune.rcp.checkpoint import load_plugins, read_config

torch.set_num_threads(1)
# the smoke-trained checkpoint misses its budget on purpose (2 steps); its card says so, here it is only an input
pytestmark = pytest.mark.filterwarnings("ignore::vtprune.rcp.checkpoint.RCPConvergenceWarning")


@pytest.fixture(scope="module")
def card_seed(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 6-layer v3 model and the seed directory `rcp_card_v3.py --smoke` writes for it."""
    from vtprune.testbed import data_v3

    root = tmp_path_factory.mktemp("where")
    model = root / "model"
    data_v3.build_model(tiny_testbed_size(text_layers=6), seed=0).save_pretrained(model)
    data_v3.build_processor().save_pretrained(model)
    drv = benchmark_script("rcp_card_v3")
    drv.run_seed(drv.parse(["--model", str(model), "--seed", "5", "--out", str(root / "card"), "--smoke"]),
                 log=lambda *_: None)  # fmt: skip
    return model, root / "card" / "seed-5"


def test_opening_pruners_changes_only_their_beta(card_seed, tmp_path):
    _, seed_dir = card_seed
    trained, cfg = load_plugins(seed_dir / "rcp")
    layers = list(cfg["pruning_layers"])
    out = ablations.pruners_opened(seed_dir / "rcp", tmp_path / "open", layers[1:])
    opened, ocfg = load_plugins(out)
    assert ocfg["delta"] == cfg["delta"] and ocfg["ablation"]["layers"] == layers[1:]
    for key, value in trained.state_dict().items():
        changed = key in {f"pruner.{x}.beta" for x in layers[1:]}
        assert torch.equal(opened.state_dict()[key], value) != changed, key
    assert all(opened.pruner[str(x)].beta.item() == ablations.OPEN_BETA for x in layers[1:])
    assert ablations.derived_from(out, seed_dir / "rcp", ablations.opened_kind(layers[1:]))
    assert not ablations.derived_from(out, seed_dir / "rcp", ablations.opened_kind(layers[-1:]))
    with pytest.raises(ValueError, match=r"no pruner at layer\(s\) \[3\] to open \(this checkpoint prunes at"):
        ablations.pruners_opened(seed_dir / "rcp", tmp_path / "bad", [3])


@pytest.mark.parametrize("term", ablations.SCORE_TERMS)
def test_a_score_term_off_is_exactly_zero_and_delta_is_recalibrated(card_seed, tmp_path, term):
    model_dir, seed_dir = card_seed
    from vtprune.runner import load

    loaded = load(str(model_dir))
    routes = ablations.calibration_routes(loaded, read_config(seed_dir / "rcp"))
    out, record = ablations.score_term_off(seed_dir / "rcp", tmp_path / term, term, loaded.model, routes,
                                           log=lambda *_: None)  # fmt: skip
    plugins, cfg = load_plugins(out)
    assert cfg["delta"] == record["delta"] and cfg["ablation"]["kind"] == f"{term}_off"
    torch.manual_seed(0)
    n, d = 12, cfg["hidden_size"]
    for pruner in plugins.pruner.values():
        pruner.eval()
        if term == "token_mlp":
            off = pruner.mlp(pruner.W_v(torch.randn(1, n, d)))
        else:
            off = pruner.agg(torch.rand(1, n, pruner.n_queries))
        assert torch.count_nonzero(off) == 0  # the term is exactly zero whatever its input
    with pytest.raises(ValueError, match="unknown score term 'beta' \\(accepted: token_mlp, attention_queries\\)"):
        ablations.score_term_off(seed_dir / "rcp", tmp_path / "x", "beta", loaded.model, routes)


def test_where_driver_end_to_end(card_seed, tmp_path):
    model_dir, seed_dir = card_seed
    drv = benchmark_script("rcp_where_v3")
    out = tmp_path / "where"
    args = drv.parse([str(seed_dir), "--out", str(out), "--model", str(model_dir), "--test-per-type", "1"])
    result = drv.run(args, log=lambda *_: None)
    rows, layers = result["rows"], result["pruning_layers"]
    assert list(rows) == list(drv.ROWS) and result["n"] == 3 * 7
    card = {n: json.loads((seed_dir / "rows" / f"{n}.json").read_text())["row"] for n in ("rcp", "rcp_untrained")}
    # the unablated rows reproduce the card's on the same questions
    assert rows["trained"]["predictions"] == card["rcp"]["predictions"]
    assert rows["untrained"]["predictions"] == card["rcp_untrained"]["predictions"]
    for base in ("trained", "untrained"):
        kept, last, first = (rows[n]["kept_by_type"] for n in (base, f"{base}_open_last", f"{base}_first_only"))
        for t in kept:  # an opened pruner keeps every token that reaches it; the others act as before
            assert last[t][:-1] == kept[t][:-1] and last[t][-1] == last[t][-2]
            assert first[t][0] == kept[t][0] and first[t] == [first[t][0]] * len(layers)
        assert rows[f"{base}_open_last"]["n_bar"] >= rows[base]["n_bar"]
        assert rows[f"{base}_first_only"]["n_bar"] >= rows[f"{base}_open_last"]["n_bar"]
    for row in rows.values():  # the paired counts agree with the accuracies on the same 21 questions
        v, gain = row["vs_trained"], row["accuracy"] - rows["trained"]["accuracy"]
        assert v["right_only_here"] - v["right_only_there"] == round(gain * 21)
    text = (out / "where.md").read_text()
    assert all(f"| {name} |" in text for name in drv.ROWS) and "95 %" in text
    # a re-run reads every row back from its cache
    again = drv.run(args, log=lambda *_: None)
    assert {k: v["predictions"] for k, v in again["rows"].items()} == {k: v["predictions"] for k, v in rows.items()}
    with pytest.raises(SystemExit, match="unknown rows"):
        drv.parse([str(seed_dir), "--out", str(out), "--rows", "trained,fastv"])
    with pytest.raises(SystemExit, match="has no rcp/ folder"):
        drv.parse([str(tmp_path), "--out", str(out)])
