"""Result tables (issue 27): readable at 80 columns with no name cut, notes as numbered footnotes, four formats
(`--format table|markdown|csv|json`), Wilson intervals; `compare` end to end on a tiny checkpoint (options with
the METHOD.KEY grammar, skipped and not-runnable cells noted, stdout carrying only the result)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from vtprune.eval.report import compare_table, eval_table
from vtprune.stats import wilson
from vtprune.tables import Col, ResultTable, si

LONG = "a_method_with_a_really_long_registered_name"


def _row(method, budget, acc=0.8, n=50, **extra):
    return {
        "method": method, "budget": budget, "accuracy": acc, "accuracy_ci95": list(wilson(round(acc * n), n)),
        "n": n, "layer_avg_tokens": float(budget), "retained_tokens": float(budget),
        "flops": {"exact": 1e9 * budget, "fastv": 1.0, "swiglu": 1.0}, "per_type": {"colour": acc, "count": acc},
        "prefill_ms_per_sample": {"min": 1.5, "median": 2.0, "rounds": 3, "batch": 16}, **extra,
    }  # fmt: skip


ROWS = [
    _row("none", 576, 0.98),
    _row("visionzip", 64, 0.9),
    _row(LONG, 64, 0.5),
    _row("pool", 192, 0.4, layer_avg_tokens=169.0),
    {"method": "fastv", "budget": 64, "infeasible": "a layer-averaged budget of 64 is infeasible for a cut at layer "
     "2 of 3 with 576 visual tokens; the smallest feasible budget is 385 (or use budget_mode='retained')"},
    {"method": "dcp_prune", "budget": 16, "error": "RuntimeError: something broke"},
]  # fmt: skip


def test_compare_table_fits_80_columns_with_names_whole_and_footnotes():
    text = compare_table(ROWS, title="a compare", skipped=[576], n_visual=576).render("table", width=80)
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 80, text
    for name in (LONG, "visionzip", "dcp_prune", "fastv"):
        assert any(ln.split()[0] == name for ln in lines if ln.split()), name  # whole, never "visionz…"
    assert "…" not in text
    # the infeasible and the failed cell: a marker in the row, the full reason (wrapped, whole) under the table
    assert "pool [1]" in text and "fastv [2]" in text and "dcp_prune [3]" in text
    flat = " ".join(text.split())
    assert "[1] pool keeps n̄ = 169.0 tokens at budget 192" in flat  # why pool@192 can sit below random
    assert "[2] fastv @ 64: not runnable: a layer-averaged budget of 64 is infeasible" in flat
    assert "smallest feasible budget is 385 (or use budget_mode='retained')" in flat
    assert "[3] dcp_prune @ 16: failed: RuntimeError: something broke" in flat
    assert "skipped budgets 576" in flat and "Wilson" in flat and "min and median of 3 rounds" in flat


def test_wide_tables_split_into_blocks_repeating_the_key_columns():
    types = {f"type_{i}": 0.5 for i in range(12)}
    rows = [_row(LONG, 64, per_type=types)]
    text = eval_table(rows, title="eval").render("table", width=80)
    assert max(len(ln) for ln in text.splitlines()) <= 80
    headers = [ln for ln in text.splitlines() if ln.startswith("method")]
    assert len(headers) >= 2  # more than one block, each starting with method and budget
    assert all(ln.split()[:2] == ["method", "budget"] for ln in headers)
    assert all(t in text for t in types) and text.count(LONG) == len(headers)


def test_formats_markdown_csv_json():
    table = compare_table(ROWS, title="t")
    md = table.render("markdown")
    assert md.splitlines()[2].startswith("| method |") and "[2] fastv @ 64: not runnable" in md
    rows = list(csv.DictReader(io.StringIO(table.render("csv"))))
    assert [r["method"] for r in rows] == [r["method"] for r in ROWS]
    assert "smallest feasible budget is 385" in rows[4]["note"] and rows[1]["accuracy"] == "0.9"
    data = json.loads(table.render("json"))
    assert data["rows"][1]["accuracy"] == 0.9 and data["rows"][4]["note"].startswith("fastv @ 64: not runnable")
    with pytest.raises(ValueError, match="unknown output format"):
        table.render("yaml")


def test_long_text_columns_wrap_instead_of_truncating():
    t = ResultTable("x", [Col("name", "name", "l"), Col("doc", "doc", "l", wrap=True)], key_columns=1)
    doc = "word " * 60
    t.add({"name": "m", "doc": doc.strip()})
    text = t.render("table", width=80)
    assert max(len(ln) for ln in text.splitlines()) <= 80
    body = text.split("\n", 3)[3]  # below the title, header and rule
    assert body.split() == ["m"] + ["word"] * 60 and len(body.splitlines()) > 1  # every word, on several lines


def test_wilson_interval_known_values():
    lo, hi = wilson(45, 50)
    assert lo == pytest.approx(0.786398, abs=1e-6) and hi == pytest.approx(0.956524, abs=1e-6)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(50, 50)
    assert lo == pytest.approx(0.928652, abs=1e-6) and hi == 1.0
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_flops_have_units():
    assert si(1.606e8) == "161 MFLOPs" and si(2.3e12) == "2.3 TFLOPs" and si(512) == "512 FLOPs"


# --- compare end to end on a tiny checkpoint -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from vtprune.testbed import build_processor
    from vtprune.testbed.model import TINY, build_model

    path = tmp_path_factory.mktemp("tiny-compare")
    build_model(TINY, seed=0).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


def test_compare_options_formats_and_exit_status(tiny_dir, tmp_path, capsys):
    from vtprune.cli import main

    base = ["compare", "--model", str(tiny_dir), "--n", "1", "--batch", "6", "--rounds", "2"]
    out = tmp_path / "a"
    argv = [*base, "--methods", "random,pool", "--budgets", "576,64", "--option", "random.seed=3", "--out", str(out)]
    assert main([*argv, "--format", "json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout is only the JSON; progress and notices went to stderr
    assert [(r["method"], r["budget"]) for r in data["rows"]] == [("none", "all"), ("random", 64), ("pool", 64)]
    assert "skipped budgets 576" in " ".join(data["notes"])
    rows = json.loads((out / "compare.json").read_text())
    assert rows[1]["options"] == {"seed": 3} and rows[2]["options"] == {}
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1
        t = r["prefill_ms_per_sample"]
        assert t["rounds"] == 2 and t["batch"] == 6 and 0 < t["min"] <= t["median"]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compare:" in captured.err and "wrote" in captured.err
    # FastV cannot act on a one-layer decoder: partial results, status 1, the failure listed and written
    out2 = tmp_path / "b"
    assert main([*base, "--methods", "pool,fastv", "--budgets", "64", "--out", str(out2)]) == 1
    captured = capsys.readouterr()
    assert "1 of 3 cells did not run (fastv@64)" in captured.err
    assert "fastv [1]" in captured.out and "not runnable" in captured.out
    assert max(len(ln) for ln in captured.out.splitlines()) <= 80
    assert "infeasible" in json.loads((out2 / "compare.json").read_text())[2]


def test_plots_are_skipped_with_a_note_without_matplotlib(monkeypatch, tmp_path, capsys):
    """compare / demo without the plot extra: table and JSON still written, the plot skipped with a note."""
    import importlib
    import sys

    cmp = importlib.import_module("vtprune.eval.compare")  # the module (vtprune.eval.compare is also a function)
    assert cmp.plotting_available()
    monkeypatch.setattr(cmp, "compare", lambda *a, **k: [dict(r) for r in ROWS])  # no model needed
    monkeypatch.setattr(cmp, "visual_tokens", lambda model: 576)
    report = cmp.run_compare_report(None, None, [{}] * 50, ["pool"], [576, 64], tmp_path, "demo", "t")
    assert report.plot_path == tmp_path / "demo.png" and report.plot_path.exists()
    assert report.failed == ["fastv@64", "dcp_prune@16"] and report.asked == len(ROWS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    assert not cmp.plotting_available()
    report = cmp.run_compare_report(None, None, [{}] * 50, ["pool"], [64], tmp_path / "b", "demo", "t")
    err = capsys.readouterr().err
    assert report.plot_path is None and "matplotlib is not installed" in err
    assert json.loads((tmp_path / "b" / "demo.json").read_text())[1]["method"] == "visionzip"
