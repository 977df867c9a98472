"""The v3 results documents: the 5-budget markdown table (budgets as column groups, significance marks, the
engine's reasons), the validity ρ against the published ranking, and the generated sections of
docs/testbed.md and README.md (between markers, replaced on every rerun)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vtprune.errors import VtpruneError
from vtprune.eval.significance import add_significance
from vtprune.eval.v3_report import (
    DOC_MARKERS,
    README_MARKERS,
    budget_table,
    main,
    regenerate,
    replace_between,
    summary_table,
    validity,
)
from vtprune.stats import wilson
from vtprune.testbed.published import published_scores

ROOT = Path(__file__).resolve().parent.parent
N = 60
REASON = ("a layer-averaged budget of 16 is infeasible for a cut at layer 2 of 32 with 576 visual tokens; the "
          "smallest feasible budget is 37 (or use budget_mode='retained')")


def _row(method, budget, correct, seeds=(0.9, 0.8, 0.85)):
    per_seed = dict(zip(("30000", "30001", "30002"), seeds, strict=True))
    bits = "1" * correct + "0" * (N - correct)
    return {"method": method, "budget": budget, "accuracy": correct / N, "n": N, "correct": correct,
            "accuracy_ci95": list(wilson(correct, N)), "correct_bits": bits, "layer_avg_tokens": float(budget),
            "flops": {"exact": 1e6 * (budget + 40)}, "per_seed": per_seed,
            "seed_mean": sum(seeds) / 3, "seed_sd": 0.05}  # fmt: skip


def _rows():
    rows = [_row("none", 576, 58), _row("divprune", 64, 57), _row("pool", 64, 30), _row("divprune", 16, 50),
            _row("pool", 16, 20), {"method": "fastv", "budget": 16, "infeasible": REASON},
            _row("fastv", 64, 56)]  # fmt: skip
    return add_significance(rows)


def test_budget_table_groups_budgets_marks_significance_and_keeps_reasons():
    table, notes = budget_table(_rows(), (64, 16))
    lines = table.splitlines()
    assert lines[0] == "| method | full (576) | 64: acc % | 64: n̄ · FLOPs % | 16: acc % | 16: n̄ · FLOPs % |"
    assert lines[2].startswith("| none (all 576 tokens) | 96.7 ±5.0 (")
    body = {ln.split(" | ")[0][2:]: ln for ln in lines[3:]}
    assert [ln.split(" | ")[0][2:] for ln in lines[3:]] == ["divprune", "fastv", "pool"]  # by accuracy at 64
    assert "**95.0** ±5.0" in body["divprune"] and "≈" in body["divprune"].split(" | ")[2]  # 57/60 vs 58/60
    assert "**93.3**" in body["fastv"]  # 56 vs 57: tied with the best
    assert "| 50.0 ±5.0" in body["pool"] and "≈" not in body["pool"]  # 30/60: significantly worse
    assert "— [1]" in body["fastv"] and notes == [f"[1] fastv @ 16: not runnable: {REASON}"]
    assert "64.0 · " in body["divprune"]  # n̄ · FLOPs % of the full model's


def test_summary_table_has_accuracy_only():
    text = summary_table(_rows(), (64, 16))
    assert text.splitlines()[0] == "| method | full (576) | 64 | 16 |"
    assert "| none (all 576 tokens) | 96.7 | | |" in text
    assert "| fastv |  | **93.3** ≈ | — |" in text and "–" not in text  # no intervals here


def test_validity_rho_is_one_for_the_published_order_and_minus_one_reversed():
    pub = published_scores(64)
    rows = [{"method": m, "budget": 64, "accuracy": v / 100} for m, v in pub.items()]
    (v64, v128) = validity(rows)
    assert v64["rho"] == pytest.approx(1.0) and v64["n"] == len(pub) >= 3 and v64["protocol"] == "restore"
    assert "error" in v128  # nothing at 128
    rev = [{"method": m, "budget": 64, "accuracy": 1 - v / 100} for m, v in pub.items()]
    assert validity(rev, budgets=(64,))[0]["rho"] == pytest.approx(-1.0)


def test_replace_between_markers_is_idempotent_and_needs_one_pair():
    text = f"a\n{DOC_MARKERS[0]} -->\nold\n{DOC_MARKERS[1]}\nb\n"
    once = replace_between(text, DOC_MARKERS, "new table")
    assert once.startswith("a\n" + DOC_MARKERS[0]) and "new table" in once and "old" not in once
    assert once.endswith(f"{DOC_MARKERS[1]}\nb\n") and replace_between(once, DOC_MARKERS, "new table") == once
    with pytest.raises(VtpruneError, match="exactly one pair of markers"):
        replace_between("no markers", DOC_MARKERS, "x")


def test_regenerate_the_repository_docs_from_a_compare_folder(tmp_path, capsys):
    """docs/testbed.md and README.md have the markers; a rerun replaces the generated part and nothing else."""
    out = tmp_path / "compare"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps(_rows()))
    meta = {"model": "builtin:shapes-v3-llava", "test_seeds": [30000, 30001, 30002], "n_per_type": 20,
            "budgets_run": [64, 16], "wall_s": 1800.0, "command": "vtprune compare", "machine": "x", "jobs": 1}
    (out / "compare-meta.json").write_text(json.dumps(meta))
    (out / "compare.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    docs_dir = tmp_path / "docs"
    docs_dir.mkdir()
    docs, readme = docs_dir / "testbed.md", tmp_path / "README.md"
    shutil.copyfile(ROOT / "docs" / "testbed.md", docs)
    shutil.copyfile(ROOT / "README.md", readme)
    before = docs.read_text()
    assert main([str(out), "--docs", str(docs), "--readme", str(readme)]) == 0
    text = docs.read_text()
    assert (docs_dir / "img" / "compare-shapes-v3-llava.png").read_bytes().endswith(b"fake")
    assert "](img/compare-shapes-v3-llava.png)" in text and "seeds 30000 / 30001 / 30002" in text
    assert f"[1] fastv @ 16: not runnable: {REASON}" in text and "30.0 min wall" in text
    head, tail = before.split(DOC_MARKERS[0])[0], before.split(DOC_MARKERS[1])[1]
    assert text.startswith(head) and text.endswith(tail)  # outside the markers: unchanged
    summary = readme.read_text().split(README_MARKERS[0])[1].split(README_MARKERS[1])[0]
    assert "| fastv |  | **93.3** ≈ | — |" in summary and "docs/testbed.md#v3-results" in summary
    regenerate(out, docs, readme)  # a rerun: the same files
    assert docs.read_text() == text
    assert main([str(tmp_path / "nothing")]) == 2 and "no compare.json" in capsys.readouterr().err
