"""`vtprune compare` on a v3 (shapes-v3 vocabulary, 32-layer) model: held-out test-split questions per seed,
per-seed accuracies, Wilson intervals, paired McNemar significance, not-runnable cells with the engine's
reason, the markdown report, `--jobs 2`; and the statistics underneath (McNemar, seed spread, sample tags)."""

from __future__ import annotations

import json
import statistics

import pytest

from vtprune.cli import main
from vtprune.errors import VtpruneError
from vtprune.eval.benchmark import (
    V2,
    V3,
    benchmark_of,
    parse_seeds,
    per_seed_accuracy,
    seed_spread,
    v3_test_samples,
)
from vtprune.eval.significance import add_significance, mcnemar_exact, same_as_full


# --- statistics --------------------------------------------------------------------------------------------
def test_mcnemar_exact_known_values():
    assert mcnemar_exact("111111", "000000") == pytest.approx(2 / 64)  # 6 discordant, all one way
    assert mcnemar_exact("000000", "111111") == pytest.approx(2 / 64)  # symmetric
    # 8 vs 2 discordant (plus 5 concordant): 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10
    a, b = "1" * 8 + "0" * 2 + "1" * 5, "0" * 8 + "1" * 2 + "1" * 5
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact("1010", "1010") == 1.0 and mcnemar_exact("10", "01") == 1.0
    with pytest.raises(VtpruneError, match="same questions"):
        mcnemar_exact("10", "101")
    with pytest.raises(VtpruneError, match="'0' / '1'"):
        mcnemar_exact("1x", "10")


def _row(method, budget, bits):
    return {"method": method, "budget": budget, "accuracy": bits.count("1") / len(bits), "n": len(bits),
            "correct_bits": bits}  # fmt: skip


def test_add_significance_marks_ties_with_best_and_with_full():
    full = _row("none", 576, "1" * 40)
    same = _row("a", 64, "1" * 40)  # identical to the full model
    worse = _row("b", 64, "0" * 20 + "1" * 20)  # 20 losses: significant against both
    close = _row("c", 64, "0" + "1" * 39)  # one loss: not significant
    other = _row("a", 16, "0" * 30 + "1" * 10)  # alone at its budget: best there, but far below full
    failed = {"method": "d", "budget": 64, "infeasible": "no"}
    add_significance([full, same, worse, close, other, failed])
    assert same["p_vs_full"] == 1.0 and same_as_full(same) and same["tied_best"] and same["best_at_budget"] == "a"
    assert worse["p_vs_full"] < 1e-5 and not same_as_full(worse) and not worse["tied_best"]
    assert close["tied_best"] and same_as_full(close) and close["p_vs"]["a"] == 1.0
    assert worse["p_vs"]["c"] == close["p_vs"]["b"] < 0.05  # the pairwise p is symmetric
    assert set(same["p_vs"]) == {"b", "c"}  # compared within its budget only
    assert other["tied_best"] and other["p_vs"] == {} and not same_as_full(other)
    assert "p_vs_full" not in full and "p_vs_full" not in failed


def test_per_seed_accuracy_and_spread():
    samples = [{"split": "test:5"}] * 4 + [{"split": "test:7"}] * 2
    per = per_seed_accuracy([True, True, False, True, False, False], samples)
    assert per == {"5": 0.75, "7": 0.0}
    mean, sd = seed_spread(per)
    assert mean == pytest.approx(0.375) and sd == pytest.approx(statistics.stdev([0.75, 0.0]))
    assert seed_spread({"5": 0.5}) == (0.5, None) and seed_spread({}) == (None, None)
    assert per_seed_accuracy([True], [{"id": "v2"}]) == {}  # untagged (v2, JSONL): no per-seed numbers
    with pytest.raises(VtpruneError, match="2 outcomes for 1 samples"):
        per_seed_accuracy([True, False], [{}])


def test_v3_questions_come_from_the_test_split_per_seed(v3_dir):
    from transformers import AutoProcessor

    from vtprune.testbed import build_processor

    samples = v3_test_samples(1, [30000, 30001])
    assert len(samples) == 14 and [s["split"] for s in samples] == ["test:30000"] * 7 + ["test:30001"] * 7
    assert {s["type"] for s in samples[:7]} == {"colour", "shape", "exist", "count", "relation", "leftof", "number"}
    assert samples[0]["question"] != samples[7]["question"] or samples[0]["image"] != samples[7]["image"]
    assert benchmark_of(AutoProcessor.from_pretrained(v3_dir)) == V3 and benchmark_of(build_processor()) == V2
    assert parse_seeds("30000, 30002") == [30000, 30002]
    for bad in ("", "a,b", "-1", "3,3"):
        with pytest.raises(VtpruneError, match="distinct seeds >= 0"):
            parse_seeds(bad)


# --- the command ------------------------------------------------------------------------------------------
def test_compare_v3_end_to_end(v3_dir, tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["compare", "--model", str(v3_dir), "--n", "1", "--test-seeds", "30000,30001", "--methods",
            "pool,fastv", "--budgets", "576,64,16", "--batch", "7", "--rounds", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 1  # FastV cannot reach 16 on 32 layers (it can on none: the cell says why)
    err = capsys.readouterr().err
    assert "1 of 5 cells did not run (fastv@16)" in err and "validity at 64 tokens" in err
    rows = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["budget"]) for r in rows] == [("none", 576), ("pool", 64), ("pool", 16), ("fastv", 64),
                                                          ("fastv", 16)]  # fmt: skip
    for r in rows[:4]:
        bits = r["correct_bits"]
        assert len(bits) == r["n"] == 14 and r["accuracy"] == pytest.approx(bits.count("1") / 14)
        assert set(r["per_seed"]) == {"30000", "30001"}
        assert r["per_seed"]["30000"] == pytest.approx(bits[:7].count("1") / 7)  # seed after seed
        assert r["seed_mean"] == pytest.approx(statistics.mean(r["per_seed"].values()))
        lo, hi = r["accuracy_ci95"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1
    assert rows[3]["layer_avg_tokens"] == pytest.approx(64, abs=1)  # the engine's n̄ over 32 layers
    assert 0 <= rows[1]["p_vs_full"] <= 1 and set(rows[1]["p_vs"]) == {"fastv"}
    reason = rows[4]["infeasible"]
    assert "smallest feasible budget" in reason
    meta = json.loads((out / "compare-meta.json").read_text())
    assert meta["test_seeds"] == [30000, 30001] and meta["n_per_type"] == 1 and meta["benchmark"] == V3
    assert meta["budgets_run"] == [64, 16] and meta["n_questions"] == 14
    md = (out / "compare.md").read_text()
    assert "| method | full (576) | 64: acc % | 64: n̄ · FLOPs % | 16: acc % |" in md
    assert "— [1]" in md and f"[1] fastv @ 16: not runnable: {reason}" in md  # the engine's reason, whole
    assert "seeds 30000 / 30001" in md and "McNemar" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    val = json.loads((out / "compare-validity.json").read_text())
    assert [v["budget"] for v in val] == [64, 128] and all("error" in v for v in val)  # two methods: no ρ


@pytest.mark.parametrize("extra,phrase", [
    (["--seed", "3"], "use --test-seeds"),
    (["--test-seeds", "x"], "distinct seeds"),
])  # fmt: skip
def test_compare_v3_refuses_v2_options(v3_dir, tmp_path, capsys, extra, phrase):
    argv = ["compare", "--model", str(v3_dir), "--methods", "pool", "--out", str(tmp_path), *extra]
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("Loading")]
    assert len(err) == 1 and phrase in err[0]


def test_v2_model_refuses_test_seeds(tmp_path, capsys):
    from vtprune.testbed import build_processor
    from vtprune.testbed.model import TINY, build_model

    build_model(TINY, seed=0).save_pretrained(tmp_path / "m")
    build_processor().save_pretrained(tmp_path / "m")
    assert main(["eval", "--model", str(tmp_path / "m"), "--test-seeds", "30000"]) == 2
    assert "--test-seeds applies to shapes-v3 models" in capsys.readouterr().err


def test_jobs_2_gives_the_rows_of_jobs_1(v3_dir):
    """Cells in two worker processes: the same per-question outcomes and token counts as in one."""
    from vtprune.eval.compare import compare
    from vtprune.eval.shapes import load_model

    model, processor = load_model(str(v3_dir))
    samples = v3_test_samples(1, [30002])
    kw = dict(methods=["pool", "divprune", "fastv"], budgets=[64, 16], batch_size=7, rounds=1)
    one = compare(model, processor, samples, **kw)
    two = compare(model, processor, samples, jobs=2, model_source=str(v3_dir), **kw)
    strip = ("prefill_ms", "prefill_ms_per_sample")
    assert [{k: v for k, v in r.items() if k not in strip} for r in one] == \
        [{k: v for k, v in r.items() if k not in strip} for r in two]
    assert all(r["prefill_ms_per_sample"] for r in two if "accuracy" in r)  # timed after, in this process
    with pytest.raises(VtpruneError, match="model_source"):
        compare(model, processor, samples, jobs=2, **kw)


def test_eval_v3_reports_per_seed_accuracy(v3_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(v3_dir), "--method", "pool", "--budget", "64", "--n", "1", "--test-seeds",
            "30001,30002", "--batch", "7", "--rounds", "1", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 14 and set(res["per_seed"]) == {"30001", "30002"}
    assert {r["id"].split("-")[2] for r in res["records"]} == {"30001", "30002"}  # v3-test-SEED-...
    k = sum(r["correct"] for r in res["records"])
    assert res["accuracy"] == pytest.approx(k / 14) and res["seed_mean"] == pytest.approx(k / 14)
    assert "per held-out test seed: 30001" in capsys.readouterr().out
