"""The RCP card driver on the built-in benchmark v3 (`benchmarks/rcp_card_v3.py`, issue 22) and the trained
v3 checkpoint's checks.

- fast: the driver end to end (train, ablations, seven rows, JSON + markdown, resume from the caches, combine) on
  a tiny 6-layer model with the v3 vocabulary;
- slow: the same on the untrained 32 × 64 v3 model (`--smoke`), and, given the trained v3 RCP asset, trained >
  untrained and adapter on ≠ adapter off on a fixed small test set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import tiny_testbed_size

from scripts import benchmark_script
from vtprune.rcp.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_plugins, read_config
from vtprune.shipped import RCP_ASSETS

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
V3_NAME = "shapes-v3-llava"
V3_ASSET = RCP_ASSETS / V3_NAME
CREATE = f"python benchmarks/rcp_card_v3.py --model builtin:{V3_NAME} --seed 42 --out runs/rcp-v3 --install"


def _driver():
    return benchmark_script("rcp_card_v3")


def _save_v3(size, path: Path) -> Path:
    from vtprune.testbed import data_v3

    data_v3.build_model(size, seed=0).save_pretrained(path)
    data_v3.build_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory) -> Path:
    size = tiny_testbed_size(text_layers=6)  # tiny widths, 6 decoder layers: room for 3 pruners + repair
    return _save_v3(size, tmp_path_factory.mktemp("tiny-v3") / "model")


def _check_card(out: Path, seed: int, n_layers: int) -> dict:
    drv = _driver()
    card = json.loads((out / f"seed-{seed}" / "card.json").read_text())
    assert list(card["rows"]) == list(drv.ROWS)  # the seven rows, in order
    n = card["test"]["n"]
    assert card["test"]["seeds"] == [30000, 30001, 30002] and n == 3 * 7 * card["test"]["per_type"]
    for name, row in card["rows"].items():
        assert row["n"] == n and 0 <= row["wilson95"][0] <= row["accuracy"] <= row["wilson95"][1] <= 1, name
        assert sum(r["n"] for r in row["per_seed"].values()) == n and len(row["per_type"]) == 7
    rows = card["rows"]
    assert rows["full"]["n_bar"] == 576 and rows["resprune"]["n_bar"] == rows["divprune"]["n_bar"] == 64
    assert rows["rcp"]["differs_from_rcp"] == 0 and rows["rcp"]["vs_rcp"] == {
        "right_only_here": 0, "right_only_rcp": 0, "p": 1.0
    }  # fmt: skip
    for name, row in rows.items():  # the paired counts agree with the accuracies on the same questions
        v = row["vs_rcp"]
        assert v["right_only_here"] - v["right_only_rcp"] == round((row["accuracy"] - rows["rcp"]["accuracy"]) * n)
        assert v["right_only_here"] + v["right_only_rcp"] <= row["differs_from_rcp"] and 0 < v["p"] <= 1, name
    # the ablation checkpoints: adapter off = same pruners with a = 0; untrained = the run's initial plug-ins
    trained, cfg = load_plugins(out / f"seed-{seed}" / "rcp")
    off, off_cfg = load_plugins(out / f"seed-{seed}" / "adapter_off")
    assert all(d.a.item() == 0 for d in off.dra.values()) and off_cfg["delta"] == cfg["delta"]
    assert all(torch.equal(off.state_dict()[k], v) for k, v in trained.state_dict().items() if not k.endswith(".a"))
    base, base_cfg = load_plugins(out / f"seed-{seed}" / "untrained")
    assert base_cfg["ablation"]["kind"] == "untrained" and base_cfg["delta"] == card["untrained_delta"]
    assert all(p.beta.item() == 2.0 for p in base.pruner.values())  # the initial β
    assert cfg["num_layers"] == n_layers and card["plugin_parameters"] == cfg["parameters"]["plugins"]
    text = (out / f"seed-{seed}" / "card.md").read_text()
    assert all(label in text for label in drv.LABELS.values()) and "95 %" in text
    assert ("NOT CONVERGED" in text) == (not cfg["convergence"]["converged"])
    return card


def test_driver_end_to_end_on_a_tiny_v3_model(tiny_v3, tmp_path, monkeypatch):
    drv = _driver()
    out = tmp_path / "card"
    lines: list[str] = []
    args = drv.parse(["--model", str(tiny_v3), "--seed", "3", "--out", str(out), "--smoke"])
    assert args.steps == 2 and args.test_per_type == 1 and args.rows == list(drv.ROWS)
    card = drv.run_seed(args, log=lambda m: lines.append(str(m)))
    _check_card(out, 3, 6)
    data = [json.loads(x) for x in (out / "data" / "questions.jsonl").read_text().splitlines()]
    assert {r["split"] for r in data} == {"calibration:20000"}  # trained on the calibration split only
    assert card["seconds_per_step"] > 0 and card["times"]["train_s"] > 0

    # a re-run resumes: nothing is trained or scored again (rows come from the caches)
    again = drv.run_seed(args, log=lambda m: lines.append(str(m)))
    assert {k: v["accuracy"] for k, v in again["rows"].items()} == {k: v["accuracy"] for k, v in card["rows"].items()}
    assert again["times"]["scoring_s"] < card["times"]["scoring_s"]
    table = drv.combine(out)
    assert "seed 3: accuracy [95 % CI] (n̄)" in table and table.count("\n| ") == 8
    assert (out / "card.md").exists() and json.loads((out / "card.json").read_text())["seeds"] == [3]
    with pytest.raises(SystemExit, match="unknown rows"):
        drv.parse(["--rows", "rcp,fastv"])

    # --install: into rcp/NAME/ (again for the same budget), a second budget into rcp/NAME/budgets/K/
    import vtprune.shipped as shipped

    monkeypatch.setattr(shipped, "RCP_ASSETS", tmp_path / "assets")
    ckpt = out / "seed-3" / "rcp"
    first = drv.install("builtin:fake", ckpt, card)
    assert first == tmp_path / "assets" / "fake" and load_plugins(first)[1]["budget"] == 64
    assert drv.install("builtin:fake", ckpt, card) == first
    assert drv.install("builtin:fake", ckpt, {**card, "budget": 128}) == first / shipped.RCP_BUDGETS / "128"
    assert shipped.shipped_rcp_dirs("builtin:fake", "rcp_plugins.safetensors") == [first, first / "budgets" / "128"]


@pytest.mark.slow
def test_driver_smoke_on_the_untrained_v3_model(tmp_path):
    """`--smoke` on the real v3 geometry (32 × 64 decoder, pruners at 1 / 13 / 25, repair at 22 / 29)."""
    from vtprune.testbed.model import V3

    model = _save_v3(V3, tmp_path / "v3")
    drv = _driver()
    out = tmp_path / "card"
    drv.run_seed(drv.parse(["--model", str(model), "--seed", "0", "--out", str(out), "--smoke"]), log=lambda *_: None)
    card = _check_card(out, 0, 32)
    cfg = read_config(out / "seed-0" / "rcp")
    assert cfg["pruning_layers"] == [1, 13, 25] and cfg["repair_layers"] == [22, 29]
    assert cfg["d_prime"] == cfg["bottleneck"] == 16 and card["plugin_parameters"] < 0.03 * card["model_parameters"]
    assert card["rows"]["rcp"]["retained"] == 576  # the first pruner acts at layer 1: all tokens enter layer 0


@pytest.mark.slow
def test_trained_v3_rcp_beats_untrained_and_its_repair_acts(tmp_path):
    """Given the trained v3 RCP asset: on a fixed held-out set, trained accuracy > untrained pruner's (own δ, the
    same budget on calibration questions) and switching the repair adapters off changes the answer logits."""
    if not (V3_ASSET / WEIGHTS_NAME).exists() or not (V3_ASSET / CONFIG_NAME).exists():
        pytest.skip(f"no trained v3 RCP asset at {V3_ASSET}; create it with `{CREATE}`")
    import vtprune
    from vtprune.rcp import ablations
    from vtprune.rcp.testbed_data import calibration_jsonl
    from vtprune.runner import load
    from vtprune.testbed.data_v3 import balanced_samples
    from vtprune.testbed.splits import calibration_split, heldout_splits

    drv = _driver()
    loaded = load(f"builtin:{V3_NAME}")
    model, processor = loaded.model, loaded.processor
    cfg = read_config(V3_ASSET)
    budget = round(cfg["budget"])
    calib = calibration_jsonl(calibration_split(), tmp_path / "calib", 6)  # 42 calibration questions
    routes = ablations.routes_from_jsonl(loaded, calib)
    base, _ = ablations.untrained(
        V3_ASSET, tmp_path / "untrained", model, routes, calib_inner=0.02, log=lambda *_: None
    )
    off = ablations.adapter_off(V3_ASSET, tmp_path / "off")

    samples = balanced_samples(heldout_splits()[0], 30)  # fixed: test seed 30000, 30 per type (210 questions)
    trained = drv.score(model, processor, samples, "rcp", budget, {"checkpoint": str(V3_ASSET)})
    untrained = drv.score(model, processor, samples, "rcp", budget, {"checkpoint": str(base)})
    # a fair comparison: both near the budget on these test questions (each δ was fitted on calibration questions)
    assert abs(untrained["n_bar"] - trained["n_bar"]) <= 0.15 * budget, (trained["n_bar"], untrained["n_bar"])
    assert trained["accuracy"] > untrained["accuracy"], (trained["accuracy"], untrained["accuracy"])

    def answer_logits(checkpoint) -> torch.Tensor:
        from vtprune.testbed.questions_v3 import answer_vocabulary
        from vtprune.testbed.tokenizer import prompt

        ids = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(answer_vocabulary())))
        vtprune.apply(model, "rcp", budget, checkpoint=str(checkpoint))
        try:
            chunk = samples[:28]
            inputs = processor(
                images=[s["image"] for s in chunk],
                text=[prompt(s["question"]) for s in chunk],
                return_tensors="pt",
                padding=True,
            )
            with torch.no_grad():
                out = model.generate(
                    **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
                )
        finally:
            vtprune.remove(model)
        return out.logits[0].float()[:, ids]

    on, off_logits = answer_logits(V3_ASSET), answer_logits(off)
    assert float((on - off_logits).abs().mean()) > 1e-3, "the repair adapters do not change the answer logits"


def test_add_paired_counts_discordant_questions_against_the_rcp_row():
    """`vs_rcp`: questions only this row / only RCP answers right, and the exact McNemar p of those counts."""
    answers = {f"q{i}": "yes" for i in range(12)}
    rcp = {k: "yes" for k in answers}
    other = dict(rcp, q0="no", q1="no", q2="no", q3="no", q4="no", q5="no", q6="no")  # 7 right only with RCP
    rows = {"rcp": {"predictions": rcp}, "other": {"predictions": other}}
    _driver().add_paired(rows, answers)
    assert rows["other"]["vs_rcp"] == {"right_only_here": 0, "right_only_rcp": 7, "p": 2 / 2**7}
    assert rows["other"]["differs_from_rcp"] == 7
    assert rows["rcp"]["vs_rcp"] == {"right_only_here": 0, "right_only_rcp": 0, "p": 1.0}


def test_train_seconds_add_up_every_resume():
    """The step log's wall clock restarts at each resume (a new segment counts from 0); the card's training time and
    seconds per step cover every segment, so a card made after a resumed or finished run does not read 0."""
    driver = _driver()
    walls = [1.0, 2.0, 3.5, 0.5, 1.5, 10.0]  # 3.5 s, then a resume that ran 10 s
    assert driver.train_seconds(walls) == 13.5
    assert driver.seconds_per_step(walls) == round(13.5 / 6, 3)
    assert driver.train_seconds([]) == 0 and driver.seconds_per_step([]) is None
