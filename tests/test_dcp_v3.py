"""DCP-Prune on the built-in benchmark v3 model (issue 22, item 2): its τ_κ is shipped, and the default recovery
is not below anchors-only by more than the interval. Both skip only while the v3 model asset is absent."""

from __future__ import annotations

import pytest
import torch

from vtprune.calibration.dcp_v3 import BUILTIN_V3, BUILTIN_V3_KEY, CREATE_V3, score, tau_for
from vtprune.methods.dcp_prune import DCPPruneConfig, load_tau_table
from vtprune.shipped import builtin_names
from vtprune.testbed.data_v3 import balanced_samples

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
@pytest.mark.parametrize("budget", [192, 64, 16])
def test_default_recovery_not_below_anchors_only(budget):
    """On the report's questions (`python benchmarks/dcp_sweep_v3.py report`: the three held-out seeds, 50 per type
    each, 1,050 questions): accuracy of the default recovery ≥ the lower end of anchors-only's pooled Wilson 95 %
    interval, each rule with its own τ_κ (~1 min per budget on 1 thread). The spec's first default (λ_ctx 0.35)
    fails it at 192 and 16 tokens (0.770 < 0.775, 0.633 < 0.642; docs/methods.md)."""
    from vtprune.stats import wilson
    from vtprune.testbed.builtin import load_builtin
    from vtprune.testbed.splits import heldout_splits

    torch.set_num_threads(1)
    model, processor = load_builtin(BUILTIN_V3)
    cap = DCPPruneConfig().context_cap
    k, n = {}, {}
    for recovery in ("mass", "none"):
        tau, _ = tau_for(model, processor, BUILTIN_V3_KEY, recovery, cap, n_images=256, batch=16)
        k[recovery] = n[recovery] = 0
        for split in heldout_splits():
            res = score(model, processor, balanced_samples(split, 50), budget, 16, tau_kappa=tau, recovery=recovery,
                        context_cap=cap)  # fmt: skip
            k[recovery] += res["k"]
            n[recovery] += res["n"]
    acc = {r: k[r] / n[r] for r in k}
    lo_none = wilson(k["none"], n["none"])[0]
    assert n["mass"] == n["none"] == 1050
    assert acc["mass"] >= lo_none, (
        f"at {budget} tokens the default recovery scores {acc['mass']:.3f}, below anchors-only "
        f"{acc['none']:.3f} by more than its interval (lower end {lo_none:.3f})"
    )
