"""The core-methods report (issue 22 item 5): kinds from the registry, the best baseline of the same kind per
budget, the engine's reasons in unreached cells, claim verdicts computed from the numbers (each flips when the
numbers flip), the optional RCP card / DCP report rows, and the generated parts of docs/methods.md and README.md
(reruns give the same files; text outside the markers is untouched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vtprune.errors import VtpruneError
from vtprune.eval.core_report import (
    DOC_MARKERS,
    IN_LLM,
    NOT_REPRODUCED,
    NOT_SIGNIFICANT,
    OVERLAPS,
    PRE_LLM,
    README_MARKERS,
    REPRODUCED,
    best_baseline,
    claim_dcp,
    claim_rcp,
    claim_resprune,
    claim_vitcop,
    core_table,
    losses,
    main,
    readme_markdown,
    regenerate,
    resolve_kinds,
)
from vtprune.eval.significance import add_significance
from vtprune.stats import wilson

ROOT = Path(__file__).resolve().parent.parent
N = 100
REASON = ("a layer-averaged budget of 16 is infeasible for a cut at layer 2 of 32 with 576 visual tokens; the "
          "smallest feasible budget is 37 (or use budget_mode='retained')")
KINDS = {"rcp": IN_LLM, "vitcop": IN_LLM, "dcp_prune": PRE_LLM, "resprune": PRE_LLM, "fastv": IN_LLM,
         "pdrop": IN_LLM, "divprune": PRE_LLM, "visionzip": PRE_LLM}


def _row(method, budget, correct):
    """A compare row the way `run_cell` writes it (first `correct` questions right, the rest wrong)."""
    bits = "1" * correct + "0" * (N - correct)
    return {"method": method, "budget": budget, "accuracy": correct / N, "n": N, "correct": correct,
            "accuracy_ci95": list(wilson(correct, N)), "correct_bits": bits, "layer_avg_tokens": float(budget),
            "flops": {"exact": 1e6 * (budget + 40)}, "options": {}}  # fmt: skip


def _rows(**acc):
    """Every core method and four baselines at the five budgets; `acc` overrides {"method@budget": correct}
    (None: not runnable there, with REASON)."""
    base = {"none@576": 80}
    for b in (192, 128, 64, 32, 16):
        base.update({f"rcp@{b}": 78, f"dcp_prune@{b}": 76, f"vitcop@{b}": 75, f"resprune@{b}": 79,
                     f"fastv@{b}": 70, f"pdrop@{b}": 72, f"divprune@{b}": 74, f"visionzip@{b}": 73})
    base.update(acc)
    rows = []
    for key, correct in base.items():
        m, b = key.split("@")
        rows.append({"method": m, "budget": int(b), "options": {}, "infeasible": REASON} if correct is None
                    else _row(m, int(b), correct))
    return add_significance(rows)


def test_kinds_come_from_the_registered_stages():
    """RCP (shipped checkpoint of the v2 model) and ViTCoP have in-LLM stages; DCP-Prune and ResPrune prune before
    the LLM; none and test methods are neither core methods nor baselines."""
    rows = _rows() + [{"method": "test_dummy", "budget": 64, "infeasible": "x"}]
    kinds = resolve_kinds(rows, {"model": "builtin:shapes-llava"})
    assert {m: kinds[m] for m in KINDS} == KINDS
    assert "none" not in kinds and "test_dummy" not in kinds
    assert resolve_kinds(rows, {}, {**KINDS, "fastv": PRE_LLM})["fastv"] == PRE_LLM  # --kind wins
    with pytest.raises(VtpruneError, match="unknown kind"):
        resolve_kinds(rows, {}, {"fastv": "middle"})


def test_best_baseline_is_the_best_of_the_same_kind_at_each_budget():
    rows = _rows(**{"pdrop@16": None, "visionzip@32": 90, "fastv@64": 95})
    assert best_baseline(rows, KINDS, IN_LLM, 64)[0]["method"] == "fastv"  # a pre-LLM 95 would not count
    assert best_baseline(rows, KINDS, IN_LLM, 128)[0]["method"] == "pdrop"
    assert best_baseline(rows, KINDS, IN_LLM, 16)[0]["method"] == "fastv"  # pdrop cannot run there
    assert best_baseline(rows, KINDS, PRE_LLM, 32)[0]["method"] == "visionzip"
    assert best_baseline(rows, KINDS, PRE_LLM, 64)[0]["method"] == "divprune"
    table = core_table(rows, KINDS)
    line = next(ln for ln in table.splitlines() if ln.startswith("| RCP") and "| 64 |" in ln)
    assert "`fastv` | 95.0" in line and "| worse (p < 0.001) |" in line  # 78 vs 95 on the same questions
    line = next(ln for ln in table.splitlines() if ln.startswith("| ResPrune") and "| 32 |" in ln)
    assert "`visionzip`" in line and "worse" in line


def test_unreached_cells_show_the_engines_reason_never_a_blank():
    rows = _rows(**{"vitcop@16": None, "fastv@32": None, "pdrop@32": None})
    table = core_table(rows, KINDS)
    v16 = next(ln for ln in table.splitlines() if ln.startswith("| ViTCoP") and "| 16 |" in ln)
    assert f"— not runnable: {REASON}" in v16
    r32 = next(ln for ln in table.splitlines() if ln.startswith("| RCP") and "| 32 |" in ln)
    assert "no in-LLM baseline ran at 32: fastv: not runnable:" in r32 and "pdrop: not runnable:" in r32
    for ln in table.splitlines()[3:]:  # below the full-model row: every cell says something
        assert "|  |" not in ln and "| |" not in ln, ln
    missing = [r for r in rows if not (r["method"] == "dcp_prune" and r["budget"] == 16)]
    assert "not in these compare results" in core_table(missing, KINDS)
    assert claim_dcp(missing).verdict.startswith("not measured (not run: dcp_prune @ 16")


def test_rcp_claim_flips_with_the_numbers():
    assert claim_rcp(_rows(**{"rcp@64": 78})).verdict == REPRODUCED  # 2 discordant: not significant
    low = claim_rcp(_rows(**{"rcp@64": 60}))
    assert low.verdict == NOT_REPRODUCED and "significantly below the full model" in low.evidence
    assert claim_rcp(_rows(**{"rcp@64": None})).verdict == f"not measured (not runnable: {REASON})"


def test_dcp_claim_flips_with_the_numbers():
    assert claim_dcp(_rows(**{"none@576": 70, "dcp_prune@16": 80})).verdict == REPRODUCED
    assert claim_dcp(_rows(**{"none@576": 70, "dcp_prune@16": 40})).verdict == NOT_REPRODUCED
    mid = claim_dcp(_rows(**{"none@576": 70, "dcp_prune@16": 65}))
    assert mid.verdict == OVERLAPS and "92.9 % of the full model's accuracy" in mid.evidence


def test_vitcop_claim_flips_with_the_numbers():
    grows = _rows(**{"vitcop@192": 80, "fastv@192": 80, "pdrop@192": 60, "vitcop@16": 80, "fastv@16": 60,
                     "pdrop@16": 50})
    c = claim_vitcop(grows, KINDS)
    assert c.verdict == REPRODUCED and "+0.0 points at 192" in c.evidence and "+20.0 at 16" in c.evidence
    shrinks = _rows(**{"vitcop@192": 80, "fastv@192": 60, "pdrop@192": 50, "vitcop@16": 80, "fastv@16": 80,
                       "pdrop@16": 50})
    assert claim_vitcop(shrinks, KINDS).verdict == NOT_REPRODUCED
    same = _rows(**{"vitcop@192": 80, "fastv@192": 78, "pdrop@192": 50, "vitcop@16": 80, "fastv@16": 77,
                    "pdrop@16": 50})
    assert claim_vitcop(same, KINDS).verdict == NOT_SIGNIFICANT
    # the smallest budget it reaches: 32 when 16 is out of reach
    cut = _rows(**{"vitcop@192": 80, "fastv@192": 80, "vitcop@32": 80, "fastv@32": 60, "vitcop@16": None})
    assert claim_vitcop(cut, KINDS).verdict == REPRODUCED and "at 32" in claim_vitcop(cut, KINDS).evidence
    only = _rows(**{f"vitcop@{b}": None for b in (128, 64, 32, 16)})
    assert claim_vitcop(only, KINDS).verdict.startswith("not measured")


def test_resprune_claim_flips_and_losses_are_stated_plainly():
    wins = _rows(**{f"resprune@{b}": 90 for b in (192, 128, 64, 32, 16)})
    assert claim_resprune(wins, KINDS).verdict == REPRODUCED
    assert "not significantly below" in losses(wins, KINDS, "resprune")
    loses = _rows(**{f"resprune@{b}": 90 for b in (192, 128, 64, 32)}, **{"resprune@16": 50})
    c = claim_resprune(loses, KINDS)
    assert c.verdict == NOT_REPRODUCED and "16: worse than divprune (50.0 vs 74.0 %" in c.evidence
    assert "ResPrune **loses** to the best pre-LLM baseline at 16 tokens (divprune 74.0 % vs 50.0 %" in losses(
        loses, KINDS, "resprune")
    assert claim_resprune(_rows(), KINDS).verdict == NOT_SIGNIFICANT  # 79 vs 74: 5 discordant, p = 0.0625


def _card(seed, trained, untrained):
    def r(acc, n_bar=64.0):
        return {"accuracy": acc, "n": 300, "wilson95": list(wilson(round(acc * 300), 300)), "n_bar": n_bar,
                "retained": n_bar, "per_seed": {}, "per_type": {}}

    rows = {"full": r(0.96, 576.0), "rcp": r(trained), "rcp_delta0": r(trained, 80.0),
            "rcp_adapter_off": r(trained), "rcp_untrained": r(untrained), "resprune": r(0.95), "divprune": r(0.94)}
    rows["rcp_adapter_off"]["differs_from_rcp"] = 0
    return {"model": "builtin:shapes-v3-llava", "seed": seed, "budget": 64, "rho": 0.111, "delta": -0.1,
            "convergence": {"converged": seed != 2, "r_bar": 0.12}, "test": {"seeds": [1], "n": 300}, "rows": rows}


def _dcp():
    pooled = [{"budget": None, "recovery": "full", "k": 90, "n": 100, "accuracy": 0.9, "ci95": list(wilson(90, 100))}]
    for b in (64, 16):
        pooled.append({"budget": b, "recovery": "none", "k": 85, "n": 100, "accuracy": 0.85,
                       "ci95": list(wilson(85, 100))})
        pooled.append({"budget": b, "recovery": "mass", "k": 60, "n": 100, "accuracy": 0.6,
                       "ci95": list(wilson(60, 100)),
                       "vs_none": {"this_right_none_wrong": 2, "none_right_this_wrong": 27}})
    return {"kind": "report", "model": "shapes-v3-llava", "splits": ["test:1"], "budgets": [64, 16],
            "context_cap": 0.35, "pooled": pooled}


def _out(tmp_path, rows):
    out = tmp_path / "compare"
    out.mkdir()
    (out / "compare.json").write_text(json.dumps(rows))
    (out / "compare-meta.json").write_text(json.dumps({"model": "builtin:shapes-v3-llava",
                                                       "test_seeds": [30000, 30001, 30002]}))
    return out


def _outside(text, markers):
    head, rest = text.split(markers[0])
    return head, rest.split(markers[1])[1]


def test_markers_are_created_after_the_title_and_after_the_v3_summary(tmp_path):
    out = _out(tmp_path, _rows())
    docs, readme = tmp_path / "methods.md", tmp_path / "README.md"
    docs.write_text("# Methods\n\nPer-method notes.\n\n## ViTCoP\n\ntext\n")
    readme.write_text("# vtprune\n\n<!-- v3-summary:begin x -->\nold\n<!-- v3-summary:end -->\n\n### Next\n")
    before_doc, before_readme = docs.read_text(), readme.read_text()
    regenerate(out, docs, readme, kinds=KINDS)
    doc, rd = docs.read_text(), readme.read_text()
    assert doc.startswith("# Methods\n\n" + DOC_MARKERS[0])
    block = DOC_MARKERS[0] + doc.split(DOC_MARKERS[0])[1].split(DOC_MARKERS[1])[0] + DOC_MARKERS[1]
    assert doc.replace(block + "\n\n", "") == before_doc  # nothing else changed
    block = README_MARKERS[0] + rd.split(README_MARKERS[0])[1].split(README_MARKERS[1])[0] + README_MARKERS[1]
    assert "<!-- v3-summary:end -->\n\n" + README_MARKERS[0] in rd
    assert rd.replace("\n\n" + block, "") == before_readme
    regenerate(out, docs, readme, kinds=KINDS)
    assert docs.read_text() == doc and readme.read_text() == rd  # markers found, not added twice


def test_regenerate_the_repository_docs(tmp_path, capsys):
    """On the repository's files: reruns give the same files; outside the markers nothing changes."""
    out = _out(tmp_path, _rows(**{"vitcop@16": None}))
    docs, readme = tmp_path / "methods.md", tmp_path / "README.md"
    shutil.copyfile(ROOT / "docs" / "methods.md", docs)
    shutil.copyfile(ROOT / "README.md", readme)
    args = [str(out), "--methods-doc", str(docs), "--readme", str(readme), "--kind", "rcp=in_llm"]
    assert main(args) == 0
    doc, rd = docs.read_text(), readme.read_text()
    assert main(args) == 0  # a rerun: the same files
    assert docs.read_text() == doc and readme.read_text() == rd
    for path, markers in ((docs, DOC_MARKERS), (readme, README_MARKERS)):
        original = (ROOT / ("docs/methods.md" if path == docs else "README.md")).read_text()
        if markers[0] in original:
            assert _outside(path.read_text(), markers) == _outside(original, markers)
    assert "## ViTCoP" in doc.split(DOC_MARKERS[1])[1]
    section = doc.split(DOC_MARKERS[0])[1].split(DOC_MARKERS[1])[0]
    assert f"— not runnable: {REASON}" in section and "No RCP card in these results" in section
    assert "benchmarks/dcp_sweep_v3.py report" in section and "**ViTCoP** — the paper claims" in section
    summary = rd.split(README_MARKERS[0])[1].split(README_MARKERS[1])[0]
    assert sum(ln.startswith("- **") for ln in summary.splitlines()) == 4
    assert "docs/methods.md#core-methods-on-the-built-in-benchmark" in summary
    # the optional inputs: every training seed's rows, recovery vs anchors-only
    (out / "rcp-card.json").write_text(json.dumps({"seeds": [1, 2], "cards": [_card(1, 0.93, 0.92),
                                                                                _card(2, 0.95, 0.80)]}))
    dcp = tmp_path / "report.json"
    dcp.write_text(json.dumps(_dcp()))
    assert main(args + ["--dcp-report", str(dcp)]) == 0
    section = docs.read_text().split(DOC_MARKERS[0])[1].split(DOC_MARKERS[1])[0]
    assert "| RCP, untrained pruner (own δ) | 92.0 [" in section and "| training seed 1 | training seed 2 |" in section
    assert "training seed 2: **not converged**" in section
    assert "trained RCP − untrained pruner: +15.0 points (intervals disjoint" in section
    # cards with per-question outcomes against RCP (`vs_rcp`): the exact McNemar test, whichever way it goes
    paired = _card(3, 0.93, 0.92)
    paired["rows"]["rcp_untrained"]["vs_rcp"] = {"right_only_here": 2, "right_only_rcp": 5, "p": 0.45}
    paired["rows"]["resprune"]["vs_rcp"] = {"right_only_here": 30, "right_only_rcp": 24, "p": 0.5}
    paired["rows"]["divprune"]["vs_rcp"] = {"right_only_here": 13, "right_only_rcp": 10, "p": 0.01}  # p as given
    (out / "rcp-card.json").write_text(json.dumps({"seeds": [3], "cards": [paired]}))
    assert main(args + ["--dcp-report", str(dcp)]) == 0
    section = docs.read_text().split(DOC_MARKERS[0])[1].split(DOC_MARKERS[1])[0]
    assert "trained RCP − untrained pruner: +1.0 points (paired 5 / 2 right only with RCP / only with it, not " \
           "significant, p = 0.45" in section  # fmt: skip
    assert "trained RCP − ResPrune: -2.0 points (paired 24 / 30 right only with RCP / only with it, not " \
           "significant" in section  # fmt: skip
    assert "trained RCP − DivPrune: -1.0 points (paired 10 / 13 right only with RCP / only with it, RCP worse, " \
           "p = 0.010" in section  # fmt: skip
    assert "| 16 | mass | 60.0 [" in section and "| +2 / −27 | worse (p < 0.001) |" in section
    assert main([str(tmp_path / "nothing")]) == 2 and "no compare.json" in capsys.readouterr().err
    assert main([str(out), "--kind", "rcp=sideways"]) == 2


def test_readme_summary_is_computed_at_64_tokens():
    rows = _rows(**{"rcp@64": 60, "resprune@64": None})
    text = readme_markdown(rows, KINDS)
    lines = [ln for ln in text.splitlines() if ln.startswith("- **")]
    assert lines[0].startswith("- **RCP** (in-LLM): 60.0 [") and "vs `pdrop` 72.0" in lines[0]
    assert "worse (p < 0.001)" in lines[0] and "paper's claim: not reproduced" in lines[0]
    assert lines[3] == (f"- **ResPrune** (pre-LLM): — not runnable: {REASON}; paper's claim: "
                        f"{NOT_SIGNIFICANT}.")  # 79 vs 74 at the other budgets


def test_missing_readme_anchor_is_an_error(tmp_path):
    out = _out(tmp_path, _rows())
    readme = tmp_path / "R.md"
    readme.write_text("# x\n")
    with pytest.raises(VtpruneError, match="no place for the core-summary markers"):
        regenerate(out, readme=readme, kinds=KINDS)
