"""`vtprune hard-subset`: a method's accuracy on the samples the downsample/pool baseline gets wrong vs right.

Hand-made per-sample results in both input formats (`vtprune eval --json`, lmms-eval samples as written
with `--log_samples`, which drop the documents), checked against counts done by hand; the pairing rules
(baseline preference, same budget, budget mode); the CLI end to end, including on real `vtprune eval` runs.
"""

from __future__ import annotations

import json

import pytest

from vtprune.cli import main
from vtprune.eval.hard_subset import hard_subset, hard_subset_report, load_results

# six samples: the baseline gets s0, s1, s2 right and s3, s4, s5 wrong
BASE = [True, True, True, False, False, False]
METHOD = [True, False, True, True, True, False]  # easy: 2/3 right; hard: 2/3 right
TYPES = ["colour", "colour", "digit", "digit", "digit", "colour"]


def _eval_json(path, method, correct, budget=64, budget_mode="layer_avg", types=TYPES):
    records = [
        {"id": f"s{i}", "type": t, "answer": "a", "prediction": "a" if c else "b", "correct": c}
        for i, (c, t) in enumerate(zip(correct, types, strict=True))
    ]
    data = {"method": method, "budget": budget, "budget_mode": budget_mode, "accuracy": sum(correct) / len(correct)}
    path.write_text(json.dumps({**data, "records": records}))
    return path


def _lmms_jsonl(path, method, correct, budget=64, metric="exact_match", types=TYPES, wrap=False):
    """lmms-eval's saved samples: no `doc`; the plugin's efficiency fields carry method and budget."""
    lines = []
    for i, (c, t) in enumerate(zip(correct, types, strict=True)):
        value = {"question_id": i, "score": float(c)} if wrap else float(c)
        s = {
            "doc_id": i,
            "target": "a",
            "filtered_resps": "a" if c else "b",
            "token_counts": [
                {"input_tokens": 70, "vtprune": {"method": method, "budget": budget, "budget_mode": "layer_avg"}}
            ],
            metric: value,
            "input": "q",
        }
        if not wrap:
            s[f"{metric}_{t}"] = float(c)
        lines.append(json.dumps(s))
    path.write_text("\n".join(lines[::-1]) + "\n")  # any order: matched by doc_id
    return path


def test_hard_and_easy_accuracies_by_hand(tmp_path):
    base = load_results(_eval_json(tmp_path / "down.json", "downsample", BASE))[0]
    res = load_results(_eval_json(tmp_path / "m.json", "fastv", METHOD))[0]
    row = hard_subset(res, base)
    assert row["n"] == 6 and row["accuracy"] == pytest.approx(4 / 6) and row["baseline_accuracy"] == 0.5
    assert (row["n_hard"], row["hard_accuracy"]) == (3, pytest.approx(2 / 3))
    assert (row["n_easy"], row["easy_accuracy"]) == (3, pytest.approx(2 / 3))
    # colour: s0 (easy, right), s1 (easy, wrong), s5 (hard, wrong); digit: s2 (easy, right), s3, s4 (hard, right)
    assert row["per_type"]["colour"] == {
        "n": 3,
        "accuracy": pytest.approx(1 / 3),
        "baseline_accuracy": pytest.approx(2 / 3),
        "n_hard": 1,
        "hard_accuracy": 0.0,
        "n_easy": 2,
        "easy_accuracy": 0.5,
    }
    assert row["per_type"]["digit"]["hard_accuracy"] == 1.0 and row["per_type"]["digit"]["n_hard"] == 2
    assert row["matched_by"] == "id" and row["method"] == "fastv" and row["baseline"] == "downsample"
    # the baseline against itself: 0 on its hard samples, 1 on its easy ones
    self_row = hard_subset(base, base)
    assert self_row["hard_accuracy"] == 0.0 and self_row["easy_accuracy"] == 1.0


def test_only_shared_samples_count(tmp_path):
    base = load_results(_eval_json(tmp_path / "down.json", "downsample", BASE))[0]
    res = load_results(_eval_json(tmp_path / "m.json", "fastv", METHOD[:4], types=TYPES[:4]))[0]
    row = hard_subset(res, base)
    assert row["n"] == 4 and row["n_hard"] == 1 and row["hard_accuracy"] == 1.0
    assert row["only_in_result"] == 0 and row["only_in_baseline"] == 2


def test_lmms_samples_match_vtprune_eval_records_by_position(tmp_path):
    base = load_results(_eval_json(tmp_path / "down.json", "downsample", BASE))[0]
    (res,) = load_results(_lmms_jsonl(tmp_path / "20260101_samples_vtprune_shapes.jsonl", "fastv", METHOD))
    assert res.method == "fastv" and res.budget == 64 and res.task == "vtprune_shapes"
    assert res.types == {f"#{i}": t for i, t in enumerate(TYPES)}  # from exact_match_<type>
    row = hard_subset(res, base)
    assert row["matched_by"] == "position" and row["n"] == 6
    assert row["hard_accuracy"] == pytest.approx(2 / 3) and row["easy_accuracy"] == pytest.approx(2 / 3)
    assert row["per_type"]["digit"]["hard_accuracy"] == 1.0


def test_lmms_dict_scores_and_explicit_metric(tmp_path):
    path = _lmms_jsonl(tmp_path / "x_samples_pope.jsonl", "fastv", METHOD, metric="pope_accuracy", wrap=True)
    (auto,) = load_results(path)
    (named,) = load_results(path, metric="pope_accuracy")
    assert auto.correct == named.correct == {f"#{i}": c for i, c in enumerate(METHOD)}
    with pytest.raises(KeyError):
        load_results(path, metric="exact_match")


def test_lmms_output_directory_and_documents_kept_in_memory(tmp_path):
    out = tmp_path / "run" / "model"
    out.mkdir(parents=True)
    _lmms_jsonl(out / "d_samples_a.jsonl", "pool", BASE)
    _lmms_jsonl(out / "d_samples_b.jsonl", "pool", BASE)
    assert sorted(r.task for r in load_results(tmp_path / "run")) == ["a", "b"]
    # samples kept in memory (simple_evaluate) still hold their documents: matched by the documents' ids
    mem = tmp_path / "mem_samples_t.jsonl"
    rows = [
        {"doc_id": i, "doc": {"id": f"s{i}", "type": t}, "exact_match": float(c)}
        for i, (c, t) in enumerate(zip(METHOD, TYPES, strict=True))
    ]
    mem.write_text("\n".join(json.dumps(r) for r in rows))
    (res,) = load_results(mem)
    base = load_results(_eval_json(tmp_path / "down.json", "downsample", BASE))[0]
    row = hard_subset(res, base)
    assert row["matched_by"] == "id" and row["hard_accuracy"] == pytest.approx(2 / 3)


def test_report_pairs_each_method_with_the_baseline_at_its_budget(tmp_path):
    files = [
        _eval_json(tmp_path / "d64.json", "downsample", BASE, budget=64),
        _eval_json(tmp_path / "d32.json", "downsample", [False] * 6, budget=32),
        _eval_json(tmp_path / "p64.json", "pool", [True] * 6, budget=64),
        _eval_json(tmp_path / "f64.json", "fastv", METHOD, budget=64),
        _eval_json(tmp_path / "f32.json", "fastv", METHOD, budget=32),
    ]
    results = [r for f in files for r in load_results(f)]
    rows = {(r["method"], r["budget"]): r for r in hard_subset_report(results)}
    # downsample is preferred over pool as the baseline; pool is then reported as a method
    assert set(rows) == {("pool", 64), ("fastv", 64), ("fastv", 32)}
    assert {r["baseline"] for r in rows.values()} == {"downsample"}
    assert rows[("fastv", 64)]["baseline_file"] == "d64.json" and rows[("fastv", 64)]["n_hard"] == 3
    assert rows[("fastv", 32)]["baseline_file"] == "d32.json" and rows[("fastv", 32)]["n_hard"] == 6
    assert rows[("pool", 64)]["hard_accuracy"] == 1.0
    # pool as the baseline by name: downsample is then a method; nothing at 32 tokens to pair with
    at64 = [r for r in results if r.budget == 64]
    pool_rows = hard_subset_report(at64, baseline="pool")
    assert {(r["method"], r["baseline"]) for r in pool_rows} == {("downsample", "pool"), ("fastv", "pool")}
    assert all(r["n_hard"] == 0 for r in pool_rows)  # pool answers everything
    with pytest.raises(ValueError, match="no baseline at budget 32"):
        hard_subset_report(results, baseline="pool")
    with pytest.raises(ValueError, match="no baseline"):
        hard_subset_report([r for r in results if r.method == "fastv"])


def test_budget_mode_breaks_ties(tmp_path):
    files = [
        _eval_json(tmp_path / "dl.json", "downsample", BASE, budget_mode="layer_avg"),
        _eval_json(tmp_path / "dr.json", "downsample", [True] * 6, budget_mode="retained"),
        _eval_json(tmp_path / "f.json", "fastv", METHOD, budget_mode="retained"),
    ]
    (row,) = hard_subset_report([r for f in files for r in load_results(f)])
    assert row["baseline_file"] == "dr.json" and row["n_hard"] == 0


def test_cli_prints_and_writes_the_report(tmp_path, capsys):
    base = _eval_json(tmp_path / "down.json", "downsample", BASE)
    res = _lmms_jsonl(tmp_path / "r_samples_vtprune_shapes.jsonl", "fastv", METHOD)
    out = tmp_path / "hard.json"
    assert main(["hard-subset", str(base), str(res), "--per-type", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "downsample gets wrong" in text and "fastv" in text and "digit" in text
    (row,) = json.loads(out.read_text())
    assert row["n_hard"] == 3 and row["hard_accuracy"] == pytest.approx(2 / 3)
    assert main(["hard-subset", str(res)]) == 2  # a user error: one line, exit status 2
    assert "no baseline" in capsys.readouterr().err


def test_on_real_vtprune_eval_runs(tmp_path):
    """`vtprune eval --json` of the built-in model for downsample and random at 64 tokens, then the report."""
    paths = {}
    for method in ("downsample", "random"):
        paths[method] = tmp_path / f"{method}.json"
        argv = ["eval", "--method", method, "--budget", "64", "--n", "2", "--batch", "12", "--json", str(paths[method])]
        assert main(argv) == 0
    out = tmp_path / "hard.json"
    assert main(["hard-subset", str(paths["downsample"]), str(paths["random"]), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    base = json.loads(paths["downsample"].read_text())["records"]
    res = {r["id"]: r["correct"] for r in json.loads(paths["random"].read_text())["records"]}
    hard = [res[r["id"]] for r in base if not r["correct"]]
    assert row["n"] == 12 and row["n_hard"] == len(hard) > 0
    assert row["hard_accuracy"] == pytest.approx(sum(hard) / len(hard))
