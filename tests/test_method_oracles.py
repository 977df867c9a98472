"""The shared oracles (spec README §11) for every registered method on every model family.

Each method has at least one case here (a test fails when a registered method has none), run on the tiny
6-layer LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL models by `families.check_oracles`. Budgets are ratios so
that they apply to 576 (LLaVA), 64/48 (NeXT) and 24/12 (Qwen) visual tokens; in-LLM cuts on 6 layers need
larger ratios (a cut at layer 2 of 6 cannot reach n̄ below N/3).
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, check_oracles, family
from oracles import generate_logits

import vtprune
from vtprune.methods import method_class

# method -> [(budget, options)]; the first case also runs with eager attention (without O1 and §11.6)
CASES: dict[str, list[tuple[float, dict]]] = {
    "none": [(0.3, {})],
    "random": [(0.3, {}), (0.5, {"layer": 2}), (0.3, {"positions": "reindex"})],
    "pool": [(0.3, {}), (0.3, {"positions": "reindex"})],
    "downsample": [(0.3, {})],  # an image transform on Qwen (tests/test_downsample.py)
    "uniform": [(0.3, {})],
    "fastv": [
        (0.6, {}),
        (0.3, {"budget_mode": "retained", "criterion": "mean_received"}),
        (0.7, {"k": 3, "positions": "reindex"}),
    ],
    "divprune": [(0.3, {})],
    "visionzip": [(0.3, {})],
    "vispruner": [(0.3, {})],
    "cdpruner": [(0.3, {"relevance": "llm"})],  # the CLIP route needs a CLIP model: tests/test_cdpruner.py
    "dcp_prune": [(0.3, {}), (0.3, {"tau_kappa": 0.0})],  # default trigger; always try TATCS
    "resprune": [(0.3, {"alpha": 0.0})],  # α ≠ 0 needs a tokenizer for the nouns: tests/test_resprune.py
    "vitcop": [(0.3, {}), (0.3, {"merge": "mean", "positions": "reindex"})],
    # three / two cuts on 6 layers: budgets must match a SparseVLM table row (ρ = 1/3) or be reachable
    "sparsevlm": [
        (1 / 3, {}),
        (1 / 3, {"recycle": False}),
        (0.4, {"schedule": "matched"}),
        (1 / 3, {"version": "2.0"}),
    ],
    "pdrop": [(0.5, {}), (0.3, {"schedule": "paper"}), (0.5, {"positions": "reindex"})],
}


#: methods whose shared-oracle cases live elsewhere, with the reason (CASES cannot take a fixture).
NO_CASE = {
    "rcp": "needs a trained checkpoint made in a fixture: tests/test_rcp_inference.py runs check_oracles "
    "(llava, llava_next, eager) and the remove() test on one",
}


def test_every_registered_method_has_a_case():
    builtin = {n for n in vtprune.methods() if method_class(n).__module__.startswith("vtprune.")}
    missing = sorted(builtin - set(CASES) - set(NO_CASE))
    assert not missing, f"methods without a shared-oracle case: {missing}"


#: (family, method) pairs that are refused by design.
EXCLUDED = {("qwen2_5_vl", "downsample")}
PARAMS = [
    pytest.param(fam, name, budget, options, id=f"{fam}-{name}-{i}")
    for name, cases in CASES.items()
    for i, (budget, options) in enumerate(cases)
    for fam in FAMILIES
    if (fam, name) not in EXCLUDED
]


@pytest.mark.parametrize("fam,name,budget,options", PARAMS)
def test_shared_oracles(fam, name, budget, options):
    check_oracles(fam, name, budget, options, selection_only=_selection_only(name, options))


def _selection_only(name: str, options: dict) -> bool:
    return not method_class(name).merges or (name == "sparsevlm" and options.get("recycle") is False)


@pytest.mark.parametrize("fam,name", [(f, n) for n in sorted(CASES) for f in FAMILIES if (f, n) not in EXCLUDED])
def test_shared_oracles_eager(fam, name):
    budget, options = CASES[name][0]
    check_oracles(
        fam,
        name,
        budget,
        options,
        selection_only=_selection_only(name, options),
        attn="eager",
        bypass=False,
        alone=False,
    )


@pytest.mark.parametrize("fam,name", [(f, n) for n in sorted(CASES) for f in FAMILIES if (f, n) not in EXCLUDED])
def test_remove_restores_stock_bit_exactly(fam, name):
    """`remove()` (via `pruned`) leaves no hook, no instance attribute and bit-identical logits."""
    f = family(fam)
    model, inputs = f.models["sdpa"], f.batches[2]
    budget, options = CASES[name][0]
    with torch.no_grad():
        before = model(**inputs).logits
    hooks_before = _hooks(model)
    with vtprune.pruned(model, name, budget, **options):
        with torch.no_grad():
            pruned = model(**inputs).logits
        assert "generate" in model.__dict__
    with torch.no_grad():
        after = model(**inputs).logits
    assert pruned.shape[1] <= before.shape[1]
    assert torch.equal(before, after)
    assert _hooks(model) == hooks_before, "a hook was left behind"
    assert "generate" not in model.__dict__ and "_vtprune" not in model.__dict__


def _hooks(model) -> list:
    """Every module's hooks (transformers keeps its own output-capturing forward hooks on vision layers)."""
    return [(name, list(m._forward_pre_hooks), list(m._forward_hooks)) for name, m in model.named_modules()]


@pytest.mark.parametrize("fam", FAMILIES)
def test_from_pretrained_round_trip(fam, tmp_path):
    """A checkpoint saved and reloaded with the family's own `from_pretrained` prunes exactly like the original."""
    f = family(fam)
    model, inputs = f.models["sdpa"], f.batches[2]
    model.save_pretrained(tmp_path / "tiny")
    loaded = type(model).from_pretrained(tmp_path / "tiny", attn_implementation="sdpa").eval()
    loaded.generation_config.eos_token_id = None
    loaded.generation_config.pad_token_id = model.generation_config.pad_token_id
    for m in (model, loaded):
        vtprune.apply(m, "fastv", 0.6)
    try:
        t0, l0 = generate_logits(model, inputs, 3)
        t1, l1 = generate_logits(loaded, inputs, 3)
    finally:
        vtprune.remove(model)
        vtprune.remove(loaded)
    assert torch.equal(t0, t1) and torch.equal(l0, l1)
