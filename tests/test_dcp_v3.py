"""DCP-Prune on the built-in benchmark v3 model (issue 22, item 2): its τ_κ is shipped, and the default recovery
is not below anchors-only by more than the interval. Both skip only while the v3 model asset is absent."""

from __future__ import annotations

import pytest
import torch

from vtprune.calibration.dcp_v3 import BUILTIN_V3, BUILTIN_V3_KEY, CREATE_V3, score, tau_for
from vtprune.methods.dcp_prune import DCPPruneConfig, load_tau_table
from vtprune.shipped import builtin_names
from vtprune.testbed.data_v3 import balanced_samples
from vtprune.testbed.splits import Split

needs_v3 = pytest.mark.skipif(
    BUILTIN_V3 not in builtin_names(),
    reason=f"the v3 model asset builtin:{BUILTIN_V3} is absent; create it: {CREATE_V3}",
)


@needs_v3
def test_v3_model_has_its_calibrated_tau_shipped():
    """`python benchmarks/dcp_sweep_v3.py calibrate --write` stored the entry, for the default recovery."""
    entry = load_tau_table().get(BUILTIN_V3_KEY)
    assert entry is not None, f"no τ_κ for {BUILTIN_V3_KEY}: run python benchmarks/dcp_sweep_v3.py calibrate --write"
    default = DCPPruneConfig()
    assert entry.get("recovery") == default.recovery and entry.get("context_cap") == default.context_cap
    assert "calibration split" in entry.get("images", "") and entry["n_images"] == 256


@needs_v3
@pytest.mark.slow
@pytest.mark.parametrize("budget", [64, 16])
def test_default_recovery_not_below_anchors_only(budget):
    """On 105 held-out questions (test seed 30 000, 15 per type): accuracy of the default recovery ≥ the lower
    end of anchors-only's Wilson 95 % interval (each rule with its own τ_κ, as in the report; ~3 min on 1 thread)."""
    from vtprune.testbed.builtin import load_builtin

    torch.set_num_threads(1)
    model, processor = load_builtin(BUILTIN_V3)
    samples = balanced_samples(Split("test", 30_000), 15)
    cap = DCPPruneConfig().context_cap
    acc = {}
    for recovery in ("mass", "none"):
        tau, _ = tau_for(model, processor, BUILTIN_V3_KEY, recovery, cap, n_images=256, batch=16)
        acc[recovery] = score(model, processor, samples, budget, 16, tau_kappa=tau, recovery=recovery, context_cap=cap)
    lo_none = acc["none"]["ci95"][0]
    assert acc["mass"]["accuracy"] >= lo_none, (
        f"at {budget} tokens the default recovery scores {acc['mass']['accuracy']:.3f}, below anchors-only "
        f"{acc['none']['accuracy']:.3f} by more than its interval (lower end {lo_none:.3f})"
    )
