"""`vtprune eval`, `compare` and `demo` run end to end offline on a tiny saved checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from vtprune.cli import main
from vtprune.testbed import build_processor
from vtprune.testbed.model import TINY, build_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-shapes")
    build_model(TINY, seed=0).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


def test_eval_json_has_scores_tokens_and_records(tiny_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_dir),
                "--method",
                "random",
                "--budget",
                "64",
                "--n",
                "2",
                "--batch",
                "4",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["n"] == len(res["records"]) == 12  # 2 per question type × 6 types
    assert 0.0 <= res["accuracy"] <= 1.0 and set(res["per_type"]) == {r["type"] for r in res["records"]}
    assert res["retained_tokens"] == 64 and res["layer_avg_tokens"] == 64
    assert all(r["n_visual"] == 576 and r["retained_tokens"] == 64 for r in res["records"])
    assert res["flops"]["exact"] > 0 and res["prefill_ms"] > 0
    assert res["accuracy"] == pytest.approx(sum(r["correct"] for r in res["records"]) / 12)


def test_compare_writes_table_json_and_plot(tiny_dir, tmp_path):
    assert (  # 1: partial results (FastV cannot run on one layer), written with the failure listed
        main(
            [
                "compare",
                "--model",
                str(tiny_dir),
                "--methods",
                "pool,fastv",
                "--budgets",
                "576,64",
                "--n",
                "1",
                "--batch",
                "6",
                "--out",
                str(tmp_path),
            ]
        )
        == 1
    )
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["method"], r["budget"]) for r in rows] == [("none", 576), ("pool", 64), ("fastv", 64)]
    assert rows[0]["layer_avg_tokens"] == 576 and rows[1]["layer_avg_tokens"] == 64
    assert "infeasible" in rows[2]  # one decoder layer: FastV cannot cut at layer 2
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_model_eval_equals_unpatched_scoring(tiny_dir):
    """`none` through the engine scores exactly like the unpatched model."""
    from vtprune.eval.shapes import load_model, load_samples, run_eval
    from vtprune.testbed import evaluate

    torch.manual_seed(0)
    model, processor = load_model(str(tiny_dir))
    samples, _ = load_samples(1)
    plain = evaluate(model, processor, samples, batch_size=3)
    ours = run_eval(model, processor, samples, "none", 576, batch_size=3)
    assert [r["prediction"] for r in plain["records"]] == [r["prediction"] for r in ours["records"]]


def test_demo_runs_offline(tmp_path, capsys):
    """The README's main job on the default built-in model (shipped): on a v3 model in-LLM and pre-LLM methods, on
    the v2 model pre-LLM methods; never a "model not found"."""
    from vtprune.demo import DEMO_METHODS, DEMO_V3_METHODS
    from vtprune.shipped import DEFAULT_BUILTIN, builtin_names

    assert DEFAULT_BUILTIN in builtin_names()
    assert main(["demo", "--quick", "--n", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())
    err = capsys.readouterr().err
    assert rows[0]["method"] == "none" and "model not found" not in err
    expected = DEMO_V3_METHODS if DEFAULT_BUILTIN == "shapes-v3-llava" else DEMO_METHODS
    assert {r["method"] for r in rows[1:]} == set(expected)
