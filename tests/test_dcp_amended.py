"""DCP-Prune, the 2026-12 amendments (dcp_prune.md step 1.5 and the τ_κ row; issue 22 item 2): the capped
mass-weighted recovery and its "none" / "uniform" options, the τ_κ fallback warning and the `last_run` record,
the calibration's layering (application module, calibration split only) and the v3 sweep driver."""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from families import check_oracles, family, grid_layout

import vtprune
from vtprune.calibration import dcp as cal
from vtprune.methods import ImageTokens, dcp_prune
from vtprune.methods.dcp_prune import FALLBACK_TAU, CalibrationWarning, DCPPrune, DCPPruneConfig, acgr
from vtprune.testbed.splits import Split, SplitError, calibration_split

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
CAPS = (0.0, 0.15, 0.25, 0.35, 0.5, 1.0)


def _crop(n_side=(6, 8), d=16, dk=8, seed=0, zero_scores=0):
    """z (n, d), s (n,), keys (n, dk) normalised, pos (n, 2) of one random crop; `zero_scores` tokens get s = 0."""
    g = torch.Generator().manual_seed(seed)
    coords, _, n = grid_layout((n_side,))
    z = torch.randn(n, d, generator=g) + 0.5 * torch.randn(1, d, generator=g)
    s = torch.rand(n, generator=g).pow(3).softmax(0)
    if zero_scores:
        s[torch.randperm(n, generator=g)[:zero_scores]] = 0.0
    keys = F.normalize(torch.randn(n, dk, generator=g), dim=1)
    return z, s, keys, coords


def _coefficients(s, keys, pos, ka, recovery, cap=0.35):
    """ACGR is linear in z: with z = I (n × n) the recovered rows are the (K_a, n) mixing coefficients."""
    n = len(s)
    anchors, coef, w = acgr(torch.eye(n), s, keys, pos, ka, 0.1, 4, recovery, cap)
    return anchors, coef.double(), w


# --------------------------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("seed,ka", [(0, 16), (1, 5), (2, 1), (3, 30), (4, 8)])
@pytest.mark.parametrize("cap", CAPS)
def test_mass_recovery_share_is_min_of_natural_share_and_cap(seed, ka, cap):
    """Spec step 1.5: own mass μ_i = s_i/mean(s), context mass m_i = Σ W_ji μ_j, share c_i = m_i/(μ_i + m_i);
    the recovered token's context share is min(c_i, λ_ctx) (exactly λ_ctx where capped) and the context tokens
    keep their relative weights W_ji μ_j. m_i is read off the "uniform" rule's coefficients (own = 1/(1 + m_i))."""
    z, s, keys, pos = _crop(seed=seed)
    anchors, mass, w = _coefficients(s, keys, pos, ka, "mass", cap)
    a_u, uni, w_u = _coefficients(s, keys, pos, ka, "uniform")
    assert torch.equal(anchors, a_u) and torch.equal(w, w_u)
    rows = torch.arange(ka)
    assert (mass >= -1e-7).all() and torch.allclose(mass.sum(1), torch.ones(ka, dtype=torch.float64), atol=1e-6)
    m = 1.0 / uni[rows, anchors] - 1.0  # context mass per anchor
    mu = s.double()[anchors] / s.double().mean()
    natural = m / (mu + m)
    share = 1.0 - mass[rows, anchors]
    want = torch.minimum(natural, torch.full_like(natural, cap))
    assert (share - want).abs().max() < 1e-5
    capped = natural > cap + 1e-6
    if 0 < cap < 1:
        assert capped.any() or ka == 1 or seed == 3  # the cap binds somewhere on these crops
    assert ((share[capped] - cap).abs() < 1e-5).all()  # exactly λ_ctx where it binds
    ctx_u = uni.clone()
    ctx_u[rows, anchors] = 0
    ctx_m = mass.clone()
    ctx_m[rows, anchors] = 0
    has = m > 1e-9
    if cap > 0:  # relative context weights unchanged by the cap
        norm_u = ctx_u[has] / ctx_u[has].sum(1, keepdim=True)
        norm_m = ctx_m[has] / ctx_m[has].sum(1, keepdim=True)
        assert (norm_u - norm_m).abs().max() < 1e-5
    else:
        assert ctx_m.abs().max() == 0  # λ_ctx = 0: anchors only


def test_mass_recovery_at_k16_keeps_the_anchor_majority():
    """The amendment's motivation: at K = 16 of 576 the original rule left anchors a tiny own share; the default
    rule keeps at least 1 − λ_ctx = 0.65 of every recovered token from its anchor."""
    z, s, keys, pos = _crop((24, 24), seed=5)
    anchors, uni, _ = _coefficients(s, keys, pos, 16, "uniform")
    _, mass, _ = _coefficients(s, keys, pos, 16, "mass")
    rows = torch.arange(16)
    assert float(uni[rows, anchors].median()) < 0.2
    assert float(mass[rows, anchors].min()) >= 0.65 - 1e-6


@pytest.mark.parametrize("ka", [1, 7, 20, 48])
def test_none_returns_the_anchors_own_features(ka):
    z, s, keys, pos = _crop(seed=ka)
    anchors, rec, w = acgr(z, s, keys, pos, ka, recovery="none")
    anchors_m, _, w_m = acgr(z, s, keys, pos, ka)
    assert torch.equal(rec, z[anchors]) and torch.equal(anchors, anchors_m) and torch.equal(w, w_m)
    assert abs(float(w.sum()) - len(z)) < 1e-4  # Σ w = N_c whatever the recovery (κ's masses)


@pytest.mark.parametrize("recovery", ["mass", "none", "uniform"])
def test_method_output_none_is_pure_selection_and_all_outputs_finite(recovery):
    """Through `select` (τ = ∞: ACGR; τ = 0: TATCS / guard): "none" emits original features of kept tokens; every
    rule gives finite features, also with zero scores (μ_i = 0 anchors) and large feature magnitudes."""
    coords, crop, n = grid_layout(((24, 24),))
    for seed, zero, scale in [(0, 0, 1.0), (1, 560, 1.0), (2, 100, 1e4), (3, 576, 1.0)]:
        z, s, keys, pos = _crop((24, 24), d=32, seed=seed, zero_scores=zero)
        img = ImageTokens(z * scale, coords, crop, [(24, 24)], torch.arange(n),
                          {"cls_attention": s, "vision_head_keys": keys, "question_embeddings": torch.randn(3, 32)})
        for tau in (math.inf, 0.0):
            plan = DCPPrune(DCPPruneConfig(tau_kappa=tau, recovery=recovery)).select(0, img, 16)
            assert torch.isfinite(plan.new_feats).all() and len(plan.keep_idx) == 16
            if recovery == "none":
                assert torch.equal(plan.new_feats, img.features[plan.keep_idx])


def test_context_without_mass_leaves_anchors_unchanged():
    """Context tokens with s = 0 carry no mass (m_i = 0): every recovered token is its anchor's own feature."""
    z, s, keys, pos = _crop(seed=4)
    s = torch.zeros_like(s)
    s[:8] = torch.rand(8) + 0.5
    anchors, rec, _ = acgr(z, s, keys, pos, 8, recovery="mass", context_cap=0.25)
    assert torch.equal(anchors, torch.arange(8)) and torch.equal(rec, z[:8])


@pytest.mark.parametrize("recovery", ["mass", "none", "uniform"])
def test_engine_batch_equals_each_image_alone(recovery):
    """Shared oracles on tiny LLaVA per recovery rule: bypass, cached decode == replay, batch == each alone."""
    method = DCPPrune(DCPPruneConfig(tau_kappa=0.05, recovery=recovery, context_cap=0.25))
    record = check_oracles("llava", method, 16, {}, selection_only=False)
    assert [s.retained_tokens for s in record.samples] == [16] * len(record.samples)


def test_recovery_options_refused_with_a_one_line_error():
    for bad, text in [({"recovery": "average"}, "recovery"), ({"context_cap": 1.2}, "context_cap")]:
        with pytest.raises(vtprune.errors.VtpruneError, match=text):
            DCPPrune(DCPPruneConfig(**bad))
    with pytest.raises(vtprune.errors.VtpruneError, match="recovery must be one of"):
        acgr(*_crop(), 4, recovery="sum")


# ----------------------------------------------------------------------------------- τ_κ warning, record


@pytest.fixture()
def fresh_warnings(monkeypatch, tmp_path):
    monkeypatch.setattr(dcp_prune, "_WARNED", set())
    monkeypatch.setenv("VTPRUNE_DCP_TAU", str(tmp_path / "user_tau.json"))  # no stray per-user entries
    return tmp_path


def _named(model, name):
    """The model as if loaded from `name` (what the engine hands the method as `model_name`)."""
    model.name_or_path = name
    return model


def _run(model, inputs, method, budget=16):
    with vtprune.pruned(model, method, budget), torch.no_grad():
        model(**inputs)
        return vtprune.last_run(model)


def test_fallback_warns_once_per_model_and_names_the_command(fresh_warnings):
    fam = family("llava")
    model, inputs = _named(fam.models["sdpa"], "some/uncalibrated-model"), fam.batches[2]
    try:
        with pytest.warns(CalibrationWarning, match=r"vtprune calibrate-dcp") as caught:
            rec = _run(model, inputs, DCPPrune())
        assert len([w for w in caught if w.category is CalibrationWarning]) == 1
        assert "some/uncalibrated-model" in str(caught[0].message) and "0.3" in str(caught[0].message)
        assert rec.method_info["tau_kappa"] == FALLBACK_TAU and rec.method_info["tau_source"] == "fallback"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same model again: silent
            assert _run(model, inputs, DCPPrune()).method_info["tau_source"] == "fallback"
        _named(model, "another/model")
        with pytest.warns(CalibrationWarning, match="another/model"):
            _run(model, inputs, DCPPrune())
    finally:
        _named(model, "")


def test_tau_sources_user_and_calibrated_without_warning(fresh_warnings):
    fam = family("llava")
    model, inputs = _named(fam.models["sdpa"], "my/calibrated-model"), fam.batches[2]
    cal.write_tau("my/calibrated-model", 0.123, None, n_images=3)  # the per-user table (VTPRUNE_DCP_TAU)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rec = _run(model, inputs, DCPPrune())
            assert (rec.method_info["tau_kappa"], rec.method_info["tau_source"]) == (0.123, "calibrated")
            assert rec.method_info["calibration_key"] == "my/calibrated-model"
            rec = _run(model, inputs, DCPPrune(DCPPruneConfig(tau_kappa=0.7)))
            assert (rec.method_info["tau_kappa"], rec.method_info["tau_source"]) == (0.7, "user")
            rec = _run(model, inputs, DCPPrune(DCPPruneConfig(calibration_key="builtin:shapes-llava")))
            assert rec.method_info["tau_source"] == "calibrated"
            assert rec.method_info["tau_kappa"] == cal.read_tau("builtin:shapes-llava")
            assert (rec.method_info["recovery"], rec.method_info["context_cap"]) == ("mass", 0.05)
    finally:
        _named(model, "")


@pytest.mark.parametrize("tau", [0.0, math.inf, None])
def test_last_run_records_kappa_and_branch_per_image(fresh_warnings, tau):
    """Per sample and image: κ_A and the branch; they agree with the method's decisions and the trigger rule
    (TATCS iff κ_A > τ and κ_T < κ_A)."""
    fam = family("llava")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    method = DCPPrune(DCPPruneConfig(tau_kappa=tau))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        rec = _run(model, inputs, method)
    infos = [info for s in rec.samples for info in s.method_info]
    decisions = [image for image in method.decisions]
    assert len(infos) == len(decisions) == 2
    for info, image in zip(infos, decisions, strict=True):
        (d,) = image
        assert info["kappa_a"] == d.kappa_a and math.isfinite(info["kappa_a"]) and info["kappa_a"] >= 0
        want = "TATCS" if (d.kappa_a > method.tau and d.kappa_t is not None and d.kappa_t < d.kappa_a) else "ACGR"
        assert info["branch"] == want and info["crops"][0]["guard"] == (d.branch == "guard")
    if tau == math.inf:
        assert {i["branch"] for i in infos} == {"ACGR"}
    if tau == 0.0:
        assert all(i["crops"][0]["kappa_t"] is not None for i in infos)
    # a bypassed prefill (budget >= N): run-level facts, no per-image entries
    rec = _run(model, inputs, DCPPrune(DCPPruneConfig(tau_kappa=0.5)), budget=10**6)
    assert rec.method_info["tau_source"] == "user" and all(i is None for s in rec.samples for i in s.method_info)


def test_next_records_one_entry_per_image_with_its_crops(fresh_warnings):
    fam = family("llava_next")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    method = DCPPrune(DCPPruneConfig(tau_kappa=0.0))
    rec = _run(model, inputs, method, budget=0.3)
    infos = [i for s in rec.samples for i in s.method_info]
    assert len(infos) == 2
    for info, image in zip(infos, method.decisions, strict=True):
        assert [c["kappa_a"] for c in info["crops"]] == [d.kappa_a for d in image] and len(image) > 2
        assert info["kappa_a"] == max(d.kappa_a for d in image if d.branch != "all")
        assert info["branch"] == ("TATCS" if any(d.branch == "tatcs" for d in image) else "ACGR")


# ------------------------------------------------------------------------------------------- layering


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_method_files_import_no_application_testbed_or_api():
    """Issue 23: the method reads the τ table only; calibration (runs models, reads the testbed) lives above."""
    assert not (ROOT / "vtprune/methods/_dcp_calibration.py").exists()
    for name in ("dcp_prune.py", "_dcp_tau.py"):
        found = _imports(ROOT / "vtprune/methods" / name)
        bad = [m for m in found if any(x in m for x in ("testbed", "calibration", "cli", "eval", "runner", "api"))]
        bad += [m for m in found if m in ("vtprune", "..")]
        assert not bad, (name, bad)


def test_builtin_calibration_refuses_the_test_split():
    for call in (
        lambda: cal.calibrate_builtin(Split("test", 30_000)),
        lambda: cal.calibrate_builtin(split=Split("test", 30_001), n_images=1),
        lambda: cal.split_images(Split("test", 30_000), 1),
    ):
        with pytest.raises(SplitError, match="held-out test split"):
            call()
    with pytest.raises(SplitError, match="needs a vtprune.testbed.splits.Split"):
        cal.calibrate_builtin("calibration")


def test_builtin_calibration_on_the_calibration_split_matches_kappa_values():
    """calibrate_builtin on a tiny untrained v3 model: the percentile of κ_A over the calibration split's scenes."""
    from vtprune.calibration.dcp_v3 import load_model
    from vtprune.testbed.tokenizer import prompt

    model, processor, _ = load_model("fresh:tiny")
    split = calibration_split()
    tau = cal.calibrate_builtin(split, model=model, processor=processor, n_images=3, percentile=100, batch_size=2)
    batches = cal.image_batches(processor, cal.split_images(split, 3), prompt(cal.BUILTIN_PROMPT), 3)
    values = cal.kappa_values(model, batches, 1 / 9)
    assert len(values) == 3 and tau == pytest.approx(max(values), abs=1e-6)
    none = cal.calibrate_builtin(split, model=model, processor=processor, n_images=3, percentile=100,
                                 batch_size=3, recovery="none")
    assert none != tau  # κ_A is measured on the recovered tokens: the rule matters


# ------------------------------------------------------------------------------------------- driver


def test_sweep_driver_smoke(tmp_path, capsys):
    """`benchmarks/dcp_sweep_v3.py` (vtprune.calibration.dcp_v3.main) on a tiny untrained v3 model, tiny counts:
    calibrate (to a table file), sweep (calibration split), report (two test seeds); files and tables written."""
    import json

    from vtprune.calibration.dcp_v3 import main

    table = tmp_path / "tau.json"
    common = ["--model", "fresh:tiny", "--n-images", "2", "--batch", "8", "--out", str(tmp_path)]
    assert main(["calibrate", *common, "--table", str(table), "--key", "tiny-v3"]) == 0
    assert cal.read_tau("tiny-v3", table) == json.loads((tmp_path / "calibrate.json").read_text())["tau_kappa"]
    assert json.loads(table.read_text())["values"]["tiny-v3"]["recovery"] == "mass"
    sweep_args = ["--per-type", "1", "--budgets", "16", "--caps", "0.15,0.5", "--recoveries", "mass,none,uniform"]
    assert main(["sweep", *common, *sweep_args, "--split", "calibration:20000"]) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["config"] for r in sweep["rows"]] == ["mass(λ=0.15)", "mass(λ=0.5)", "none", "uniform"]
    assert {r["split"] for r in sweep["rows"]} == {"calibration:20000"}
    assert main(["sweep", *common, "--per-type", "1", "--budgets", "16", "--caps", "0.05"]) == 0  # the defaults
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["config"] for r in sweep["rows"]] == ["mass(λ=0.05)", "none"]
    assert {r["split"] for r in sweep["rows"]} == {"calibration:20001"}
    assert all(r["n"] == 7 and 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in sweep["rows"])
    assert main(["report", *common, "--per-type", "1", "--budgets", "32,16", "--seeds", "30000,30001"]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    pooled = {(p["budget"], p["recovery"]): p for p in rep["pooled"]}
    assert set(pooled) == {(None, "full"), (32, "mass"), (32, "none"), (16, "mass"), (16, "none")}
    assert pooled[(16, "mass")]["n"] == 14 and "vs_none" in pooled[(16, "mass")]
    assert {r["split"] for r in rep["rows"]} == {"test:30000", "test:30001"}
    out = capsys.readouterr().out
    assert "| tokens | mass | none | vs none (+/−) |" in out and (tmp_path / "report.md").exists()
    with pytest.raises(SplitError):
        main(["sweep", *common, "--per-type", "1", "--budgets", "16", "--split", "test"])
