"""benchmarks/v3_answer_table.py on hand-written score records."""

import json

import pytest

from scripts import benchmark_script


def _records():
    rows = [("count", "3", "2"), ("count", "3", "3"), ("count", "10", "10"), ("count", "2", "2"),
            ("count", "3", "2"), ("colour", "red", "red")]
    return [{"id": str(i), "type": t, "answer": a, "prediction": p, "correct": a == p}
            for i, (t, a, p) in enumerate(rows)]


def test_table_counts_each_answer_and_what_was_given_instead():
    table_of = benchmark_script("v3_answer_table")
    table = table_of.answer_table(_records(), "count")
    assert list(table) == ["2", "3", "10"]  # by value, not as text
    assert table["3"] == {"2": 2, "3": 1} and table["2"] == {"2": 1}
    lines = table_of.format_table(table)
    assert lines[1] == "  3: 1/3  given: 2 2, 3 1"
    assert lines[-1] == "  answers given: 2 3, 3 1, 10 1"


def test_cli_reads_records_files_and_refuses_one_without_the_type(tmp_path, capsys):
    table_of = benchmark_script("v3_answer_table")
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _records()) + "\n")
    table_of.main([str(path)])
    assert "3: 1/3" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no number questions"):
        table_of.main([str(path), "--type", "number"])
