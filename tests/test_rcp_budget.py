"""RCP, issue 22: the amended repair normalisation, reaching the budget (β's gradient and learning rate,
convergence record, card, load warning), plug-in widths scaled to the model, calibration-split training data."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from factories import tiny_testbed_size

from vtprune.errors import VtpruneError
from vtprune.rcp.checkpoint import (
    CARD_NAME,
    CONFIG_NAME,
    RCPConvergenceWarning,
    load_plugins,
    read_config,
    save_checkpoint,
    write_card,
)
from vtprune.rcp.losses import moment_loss, repair_loss, teacher_scale
from vtprune.rcp.modules import RCPPlugins, count_parameters, scaled_width
from vtprune.rcp.placement import placement_for
from vtprune.rcp.schedule import beta_lr_factor, lr_factor
from vtprune.rcp.train import (
    RCPTrainConfig,
    TrainStep,
    budget_step,
    convergence,
    param_groups,
    plugin_widths,
    train,
)
from vtprune.testbed.splits import Split, SplitError, calibration_split, heldout_splits, train_split

torch.set_num_threads(1)
RHO = 64 / 576


def _raw_moment_loss(hp: torch.Tensor, ho: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference's loss on raw states, written out independently."""
    mu_p, mu_o = hp.mean(0), ho.mean(0)
    v_p = (hp**2).mean(0) - mu_p**2
    v_o = (ho**2).mean(0) - mu_o**2
    return ((mu_p - mu_o) ** 2).mean() + alpha * ((v_p.clamp_min(0) - v_o.clamp_min(0)) ** 2).mean()


def _rows(seed: int = 0, t: int = 12, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    # dimensions on very different scales, as in a residual stream
    scales = torch.logspace(-1, 3, d)
    hp = (torch.randn(t, d, generator=g) + 0.3) * scales
    ho = torch.randn(t + 3, d, generator=g) * scales
    return hp.double(), ho.double()


# --- 1. repair normalisation ---------------------------------------------------------------------------------
def test_none_reproduces_the_raw_reference_loss():
    hp, ho = _rows()
    for alpha in (0.0, 3.0):
        want = _raw_moment_loss(hp.float(), ho.float(), alpha)
        assert torch.allclose(moment_loss(hp, ho, alpha, norm="none"), want, rtol=1e-5)
        got = repair_loss({2: hp, 5: hp * 2}, {2: ho, 5: ho}, alpha, norm="none")
        want2 = (want + _raw_moment_loss(hp.float() * 2, ho.float(), alpha)) / 2
        assert torch.allclose(got, want2, rtol=1e-5)


def test_teacher_std_is_the_raw_loss_of_standardised_states():
    hp, ho = _rows(1)
    hp, ho = hp.float(), ho.float()
    sd = ho.std(0, correction=0) + 1e-6
    assert torch.allclose(teacher_scale(ho), sd)
    want = _raw_moment_loss(hp / sd, ho / sd, 3.0)
    assert torch.allclose(moment_loss(hp, ho, 3.0), want, rtol=1e-5)  # teacher_std is the default
    assert torch.allclose(repair_loss({1: hp}, {1: ho}, 3.0), want, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-1, 10.0, 1e4])
def test_normalised_loss_is_invariant_to_scaling_the_states(scale):
    hp, ho = _rows(2)
    base = moment_loss(hp, ho, 3.0, norm="teacher_std")
    scaled = moment_loss(hp * scale, ho * scale, 3.0, norm="teacher_std")
    assert float(base) > 0.01
    assert float(scaled) == pytest.approx(float(base), rel=1e-3)  # up to the +1e-6 on the std
    raw, raw_scaled = moment_loss(hp, ho, 3.0, norm="none"), moment_loss(hp * scale, ho * scale, 3.0, norm="none")
    ratio = float(raw_scaled) / float(raw)  # the raw loss is not invariant (s² on the means, s⁴ on the variances)
    assert scale**2 * 0.999 <= ratio <= scale**4 * 1.001 if scale > 1 else scale**4 * 0.999 <= ratio <= scale**2 * 1.001


def test_normalised_loss_zero_for_identical_states_and_teacher_scale_detached():
    hp, ho = _rows(3)
    assert float(moment_loss(ho, ho)) == pytest.approx(0.0, abs=1e-10)
    x = hp.float().clone().requires_grad_(True)
    t = ho.float().clone().requires_grad_(True)
    moment_loss(x, t).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # the scale is detached: the teacher's gradient is that of the loss with the scale held fixed
    sd = teacher_scale(t)
    t2 = ho.float().clone().requires_grad_(True)
    _raw_moment_loss(x.detach() / sd, t2 / sd, 3.0).backward()
    assert torch.allclose(t.grad, t2.grad, rtol=1e-4, atol=1e-8)


def test_unknown_repair_norm_is_refused():
    hp, ho = _rows()
    with pytest.raises(ValueError, match="repair_norm must be one of teacher_std, none, got 'std'"):
        moment_loss(hp, ho, norm="std")
    with pytest.raises(VtpruneError, match="repair_norm must be one of"):
        train("unused", "unused.jsonl", "/nonexistent", RCPTrainConfig(repair_norm="std"))


# --- 3. plug-in widths scaled to the model -----------------------------------------------------------------------
def test_plugin_widths_scale_with_the_decoder_width():
    assert scaled_width(4096) == 512  # the spec's LLaVA-1.5-7B widths
    assert scaled_width(3584) == 448
    assert scaled_width(160) == 20
    assert scaled_width(64) == 16 and scaled_width(32) == 16  # floor: 4 dimensions per head
    assert all(scaled_width(d) % 4 == 0 for d in range(16, 5000, 37))
    assert plugin_widths(RCPTrainConfig(), 64) == (16, 16)
    assert plugin_widths(RCPTrainConfig(d_prime=32, bottleneck=8), 64) == (32, 8)
    with pytest.raises(ValueError, match="hidden size must be an int >= 1"):
        scaled_width(0)
    with pytest.raises(VtpruneError, match=r"d_prime \(18\) must be a multiple of heads \(4\)"):
        train("unused", "unused.jsonl", "/nonexistent", RCPTrainConfig(d_prime=18))
    # the 64-wide v3 decoder: plug-ins are a small fraction of the 2.7 M-parameter model (they were 5.4 M)
    small = RCPPlugins(64, placement_for(32, RHO), d_prime=16, bottleneck=16)
    big = RCPPlugins(64, placement_for(32, RHO), d_prime=512, bottleneck=512)
    assert count_parameters(small) < 60_000 < 2_000_000 < count_parameters(big)


# --- 2. reaching the budget ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 6-layer testbed model and a 12-question JSONL (v2 vocabulary, as in test_rcp_training)."""
    from vtprune.runner import load
    from vtprune.testbed import build_model, build_processor, export_jsonl

    root = tmp_path_factory.mktemp("rcp-budget")
    size = tiny_testbed_size(text_layers=6)  # tiny widths, 6 decoder layers: room for 3 pruners + repair
    build_model(size, seed=0).save_pretrained(root / "model")
    build_processor().save_pretrained(root / "model")
    data = export_jsonl(root / "data", seed=5, n_per_type=2)
    return root / "model", data, load(str(root / "model"))


def test_beta_receives_gradient_at_every_pruner(tiny):
    """The sparsity loss reaches each pruner's β through the straight-through mask, with the sign that lowers r̄
    when r̄ > r* (the shipped run's β did not move: see the trainer's docstring)."""
    from vtprune.rcp.data import Collator, read_examples

    _, data, loaded = tiny
    model = loaded.model.requires_grad_(False)
    batch = Collator(loaded)(read_examples(data)[:2])
    torch.manual_seed(0)
    placement = placement_for(6, RHO)
    plugins = RCPPlugins(32, placement, d_prime=16, bottleneck=16)
    cfg = RCPTrainConfig(lambda_task=0.0, lambda_repair=0.0)
    res = TrainStep(model, plugins, cfg, RHO)(batch, [0, 0], 1.0, True, RHO)
    assert float(res["r_bar"]) > RHO  # untrained: most tokens kept
    res["loss"].backward()
    for ell in placement.pruning_layers:
        grad = plugins.pruner[str(ell)].beta.grad
        assert grad is not None and float(grad) > 0, (ell, grad)  # gradient descent lowers β, hence r̄
    # with every loss term, β still gets a finite non-zero gradient
    plugins.zero_grad()
    TrainStep(model, plugins, RCPTrainConfig(), RHO)(batch, [0, 0], 0.5, True, RHO)["loss"].backward()
    assert all(torch.isfinite(p.beta.grad) and float(p.beta.grad) != 0 for p in plugins.pruner.values())


def test_beta_update_modes_and_the_budget_controller():
    plugins = RCPPlugins(32, placement_for(6, RHO), d_prime=16, bottleneck=16)
    betas = {id(p.beta) for p in plugins.pruner.values()}
    n = count_parameters(plugins)
    budget = param_groups(plugins, RCPTrainConfig())  # default: the controller moves β, AdamW the rest
    assert len(budget) == 1 and not betas & {id(p) for p in budget[0]["params"]}
    assert sum(p.numel() for p in budget[0]["params"]) == n - 3
    loss = param_groups(plugins, RCPTrainConfig(beta_update="loss", beta_lr=0.05))
    assert len(loss) == 2 and loss[1]["lr"] == 0.05 and loss[1]["weight_decay"] == 0.0
    assert {id(p) for p in loss[1]["params"]} == betas
    spec = param_groups(plugins, RCPTrainConfig(beta_update="loss", beta_lr=None))  # the spec's single group
    assert len(spec) == 1 and sum(p.numel() for p in spec[0]["params"]) == n
    # β ← β − step·sign(r̄ − r*)
    budget_step(plugins, 0.5, RHO, 0.05)
    assert all(p.beta.item() == pytest.approx(1.95) for p in plugins.pruner.values())
    budget_step(plugins, 0.05, RHO, 0.2)
    assert all(p.beta.item() == pytest.approx(2.15) for p in plugins.pruner.values())
    budget_step(plugins, RHO, RHO, 0.2)
    assert all(p.beta.item() == pytest.approx(2.15) for p in plugins.pruner.values())
    # its step: the same warm-up as the learning rate, then constant (the learning rate decays to 0.1·lr)
    assert beta_lr_factor(0, 100) == lr_factor(0, 100) and beta_lr_factor(99, 100) == 1.0
    assert lr_factor(99, 100) == pytest.approx(0.1)
    for bad, msg in (
        ({"beta_update": "adam"}, "beta_update must be 'budget' or 'loss'"),
        ({"beta_lr": None}, "needs a beta_lr > 0"),
        ({"beta_lr": -1.0}, "beta_lr must be a number > 0"),
    ):
        with pytest.raises(VtpruneError, match=msg):
            train("unused", "unused.jsonl", "/nonexistent", RCPTrainConfig(**bad))


def test_beta_moves_beyond_the_base_learning_rate_bound(tiny, tmp_path):
    """Adam moves a parameter by about its learning rate per step: with the spec's single group β can travel at
    most ~lr·steps; the budget controller moves it by beta_lr per step towards the budget."""
    model_dir, data, loaded = tiny
    kw = dict(device="cpu", progress=False, loaded=loaded, return_plugins=True, log=lambda *_: None)
    base = dict(steps=4, batch=2, grad_accum=1, lr=1e-4, d_prime=16, bottleneck=16, calib_n=0, sparsity_warm=0.0)
    own = train(str(model_dir), data, tmp_path / "own", RCPTrainConfig(**base), **kw)
    one = train(str(model_dir), data, tmp_path / "one", RCPTrainConfig(beta_update="loss", beta_lr=None, **base), **kw)
    moved_own = [2.0 - p.beta.item() for p in own["plugins"].pruner.values()]
    moved_one = [2.0 - p.beta.item() for p in one["plugins"].pruner.values()]
    assert all(abs(m) <= 4 * 1e-4 * 1.5 for m in moved_one), moved_one
    log = [json.loads(x) for x in (tmp_path / "own" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["r_bar"] > RHO for r in log)  # untrained and 4 steps: above the budget throughout
    assert moved_own == pytest.approx([4 * 0.05] * 3)  # down by beta_lr at each step (no warm-up at 4 steps)
    assert all(len(r["r_k"]) == 3 and "r_target" in r and "r_bar" in r for r in log)


def _records(r_bars: list[float]) -> list[dict]:
    return [{"step": i, "r_bar": r, "r_k": [r, r, r]} for i, r in enumerate(r_bars)]


def test_convergence_record():
    cfg = RCPTrainConfig()
    ok = convergence(_records([0.9] * 18 + [RHO * 1.05, RHO * 0.97]), RHO, -0.3, cfg, True)
    assert ok["converged"] and ok["window"] == 2 and ok["r_bar"] == pytest.approx(RHO * 1.01, rel=1e-3)
    far = convergence(_records([0.9] * 18 + [RHO * 1.2, RHO * 1.2]), RHO, 0.0, cfg, True)
    assert not far["converged"] and far["rel_error"] == pytest.approx(0.2, rel=1e-3)
    big_delta = convergence(_records([RHO] * 20), RHO, -1.5, cfg, True)
    assert not big_delta["converged"] and big_delta["rel_error"] == 0
    assert convergence(_records([RHO] * 20), RHO, 1.0, cfg, True)["converged"]  # |δ| = 1.0 is allowed
    assert not convergence([], RHO, 0.0, cfg, False)["converged"]


def _save(tmp_path, conv: dict | None):
    torch.manual_seed(0)
    plugins = RCPPlugins(32, placement_for(6, RHO), d_prime=16, bottleneck=16)
    cfg = {
        "model_class": "LlavaForConditionalGeneration",
        "num_layers": 6,
        "rho": RHO,
        "budget": 64.0,
        "delta": -0.4,
        "seed": 1,
        "base_model": {"id": "tiny"},
        "convergence": conv,
        "parameters": {"plugins": count_parameters(plugins), "model": 10**6, "ratio": count_parameters(plugins) / 1e6},
    }
    save_checkpoint(tmp_path, plugins, cfg)
    return write_card(tmp_path)


def test_card_and_load_warning_for_a_run_that_did_not_converge(tmp_path):
    bad = convergence(_records([0.38] * 10), RHO, -0.82, RCPTrainConfig(), True)
    card = _save(tmp_path / "bad", bad)
    text = card.read_text()
    assert card.name == CARD_NAME and "**NOT CONVERGED" in text and "r_bar 0.3800" in text and "delta -0.820" in text
    assert "d' = 16, b = 16" in text and "of the model" in text
    with pytest.warns(RCPConvergenceWarning, match="NOT CONVERGED: training ended at r_bar 0.3800"):
        load_plugins(tmp_path / "bad")
    with warnings.catch_warnings():  # once per checkpoint
        warnings.simplefilter("error")
        load_plugins(tmp_path / "bad")

    good = convergence(_records([RHO] * 10), RHO, 0.2, RCPTrainConfig(), True)
    text = _save(tmp_path / "good", good).read_text()
    assert "NOT CONVERGED" not in text and text.count("Converged: training ended at r_bar 0.1111") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_plugins(tmp_path / "good")
    config = json.loads((tmp_path / "good" / CONFIG_NAME).read_text())
    config["convergence"] = {"r_bar": 1}  # no boolean verdict: refused with the field named
    (tmp_path / "good" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(VtpruneError, match="field 'convergence' must be null or an object with a boolean"):
        read_config(tmp_path / "good")


def test_training_records_budget_parameters_and_card(tiny, tmp_path):
    model_dir, data, loaded = tiny
    cfg = RCPTrainConfig(steps=2, batch=2, grad_accum=1, calib_n=2, calib_batch=2)
    lines: list[str] = []
    summary = train(
        str(model_dir),
        data,
        tmp_path,
        cfg,
        device="cpu",
        progress=False,
        loaded=loaded,
        log=lambda m: lines.append(str(m)),
    )
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    conv = config["convergence"]
    assert conv == summary["convergence"] and conv["rho"] == pytest.approx(RHO) and len(conv["r_k"]) == 3
    assert conv["delta"] == config["delta"] and isinstance(conv["converged"], bool)
    assert conv["converged"] == (conv["rel_error"] <= 0.1 and abs(conv["delta"]) <= 1.0)
    assert 0 < conv["r_bar_eval_delta0"] <= 1
    assert config["repair_norm"] == "teacher_std" and config["d_prime"] == 16 and config["bottleneck"] == 16
    params = config["parameters"]
    assert params["model"] == sum(p.numel() for p in loaded.model.parameters())
    assert params["plugins"] == summary["trainable_parameters"]
    assert any("trainable parameters next to the model's" in m for m in lines)
    assert any(m.startswith("step 2/2: r̄") and "keep per pruner" in m and "(r* " in m for m in lines)
    assert (tmp_path / CARD_NAME).read_text().startswith("# RCP checkpoint for")


# --- 4. training data from the calibration split only ------------------------------------------------------------
def test_calibration_data_builder_refuses_test_and_train_splits(tmp_path):
    from vtprune.rcp.data import read_examples
    from vtprune.rcp.testbed_data import calibration_examples, calibration_jsonl

    for split in (*heldout_splits(), Split("test", 5)):
        with pytest.raises(SplitError, match="held-out test split"):
            calibration_jsonl(split, tmp_path / "x", 1)
        with pytest.raises(SplitError):
            calibration_examples(split, 1)
    with pytest.raises(SplitError, match="calibration split only"):
        calibration_jsonl(train_split(), tmp_path / "x", 1)
    assert not (tmp_path / "x").exists()
    path = calibration_jsonl(calibration_split(), tmp_path / "cal", 1)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 7 and {r["split"] for r in rows} == {str(calibration_split())}
    assert len({r["type"] for r in rows}) == 7
    examples = read_examples(path)  # the trainer's reader takes it
    assert [e.key for e in examples] == [r["id"] for r in rows] and all(e.image.exists() for e in examples)
    mtime = path.stat().st_mtime_ns
    assert calibration_jsonl(calibration_split(), tmp_path / "cal", 1) == path and path.stat().st_mtime_ns == mtime


def test_method_file_does_not_import_the_data_builder():
    import vtprune.methods.rcp as method

    imports = [ln for ln in open(method.__file__).read().splitlines() if ln.lstrip().startswith(("import ", "from "))]
    assert imports and not any("testbed" in ln or ".train" in ln or "ablations" in ln for ln in imports), imports


def test_cli_split_option_refuses_the_test_split_and_parses_beta_lr(tiny, tmp_path):
    import argparse

    from vtprune.commands.rcp import add_parser

    model_dir, _, _ = tiny
    parser = argparse.ArgumentParser(prog="vtprune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    common = ["train-rcp", "--model", str(model_dir), "--out", str(tmp_path / "o")]
    args = parser.parse_args([*common, "--split", "test:30001", "--per-type", "1"])
    with pytest.raises(SplitError, match="held-out test split"):
        args.func(args)
    assert not (tmp_path / "o" / "data").exists()
    assert parser.parse_args([*common, "--data", "x.jsonl", "--beta-lr", "none"]).beta_lr is None
    assert parser.parse_args([*common, "--data", "x.jsonl"]).beta_lr == RCPTrainConfig().beta_lr
    parsed = parser.parse_args([*common, "--data", "x.jsonl", "--repair-norm", "none", "--d-prime", "32"])
    assert parsed.repair_norm == "none" and parsed.d_prime == 32 and parsed.bottleneck is None
    for bad in (["--beta-lr", "0"], ["--repair-norm", "std"], []):  # [] : neither --data nor --split
        with pytest.raises(SystemExit):
            parser.parse_args([*common, *(["--data", "x.jsonl"] if bad else []), *bad])
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--data", "x.jsonl", "--split", "calibration"])
