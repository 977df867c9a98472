"""benchmarks/v3_score_compare.py on hand-written score records."""

import json

import pytest

from scripts import benchmark_script


def _write(path, outcomes):
    rows = [{"id": str(i), "type": t, "answer": "a", "prediction": "a" if ok else "b", "correct": ok}
            for i, (t, ok) in enumerate(outcomes)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_per_type_counts_right_and_asked():
    cmp = benchmark_script("v3_score_compare")
    rec = {"0": {"type": "count", "correct": True}, "1": {"type": "count", "correct": False},
           "2": {"type": "shape", "correct": True}}
    assert cmp.per_type(rec) == {"overall": (2, 3), "count": (1, 2), "shape": (1, 1)}


def test_paired_counts_discordant_questions_and_tests_them(tmp_path, capsys):
    cmp = benchmark_script("v3_score_compare")
    a = _write(tmp_path / "a.jsonl", [("count", False)] * 10 + [("shape", True)] * 4)
    b = _write(tmp_path / "b.jsonl", [("count", True)] * 10 + [("shape", True)] * 4)
    wins, losses, p = cmp.paired(cmp.read_records(a), cmp.read_records(b))
    assert (wins, losses) == (10, 0) and p == pytest.approx(2 / 2**10)
    cmp.main([str(a), str(b)])
    out = capsys.readouterr().out
    assert "b vs a: right only here 10, only there 0" in out
    assert "0.286" in out and "1.000" in out  # 4/14 and 14/14 overall


def test_refuses_records_of_different_questions(tmp_path):
    cmp = benchmark_script("v3_score_compare")
    a = _write(tmp_path / "a.jsonl", [("count", True)] * 3)
    b = _write(tmp_path / "b.jsonl", [("count", True)] * 4)
    with pytest.raises(SystemExit, match="different questions"):
        cmp.main([str(a), str(b)])
