"""`vtprune demo` on a v3 model (32-layer decoder): in-LLM (FastV, PDrop, ViTCoP) and pre-LLM methods side by
side on held-out test questions, all cells run, the picture and the report written."""

from __future__ import annotations

import json

import pytest

from vtprune.demo import DEMO_V3_METHODS, run_demo


def test_demo_on_a_v3_model_shows_in_llm_and_pre_llm_methods(v3_dir, tmp_path, capsys):
    assert run_demo(quick=True, out=tmp_path, n_per_type=2, model=str(v3_dir)) == 0
    rows = json.loads((tmp_path / "demo.json").read_text())
    assert rows[0]["method"] == "none" and rows[0]["n"] == 7  # one question per type of test seed 30000
    ran = {r["method"]: r for r in rows[1:]}
    assert set(ran) == set(DEMO_V3_METHODS) >= {"fastv", "pdrop", "vitcop", "pool", "divprune"}
    for m in ("fastv", "pdrop", "vitcop"):  # pruning inside the 32-layer decoder, n̄ at the budget
        assert ran[m]["budget"] == 64 and ran[m]["layer_avg_tokens"] == pytest.approx(64, abs=1.5), m
        assert ran[m]["retained_tokens"] > 64  # all 576 (or ViTCoP's pre-LLM part) enter layer 0
    assert ran["pool"]["retained_tokens"] == 64  # pre-LLM: 64 enter layer 0
    meta = json.loads((tmp_path / "demo-meta.json").read_text())
    assert meta["test_seeds"] == [30000] and meta["benchmark"] == "shapes-v3"
    assert (tmp_path / "show.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "demo.md").exists()
    assert "fastv, vitcop at 64" in capsys.readouterr().err
