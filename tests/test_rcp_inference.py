"""RCP inference through the engine (spec rcp.md §D): physical discard + repair on tiny 6-layer models, with
checkpoints written by `vtprune.rcp.save_checkpoint` (random plug-ins whose pruners drop tokens at every
pruning layer and whose repair adapters change the generation rows).

Property 8 (physical route == mask route, untrimmed caches), repair only at generation rows, cached decode ==
uncached replay and batch independence (`check_oracles`), `remove()`, property 2 on the physical route, errors.
"""

from __future__ import annotations

import pytest
import torch
from families import check_oracles, family

import vtprune
from vtprune.errors import BudgetError, UnsupportedModelError, VtpruneError
from vtprune.rcp import RCPPlugins, placement_for, save_checkpoint
from vtprune.rcp.mask_route import mask_route_forward

TOL = 1e-4
CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


def _plugins(fam: str, rho: float, seed: int = 0) -> RCPPlugins:
    """Plug-ins for the family's tiny model: β of each pruner set so that about half of the still-kept tokens
    are dropped there (on the mask route), DRAs with a = 1 and non-zero FiLM weights."""
    f = family(fam)
    model, inputs = f.models["sdpa"], f.batches[2]
    hidden = model.config.text_config.hidden_size
    torch.manual_seed(seed)
    plugins = RCPPlugins(hidden, placement_for(6, rho), d_prime=32, bottleneck=24)
    with torch.no_grad():
        for pr in plugins.pruner.values():
            pr.mlp[-1].weight.normal_(0, 0.5)
            pr.beta.fill_(1e4)  # keep everything until calibrated
        for dra in plugins.dra.values():
            dra.a.fill_(1.0)
            dra.W_gamma.weight.normal_(0, 0.1)
            dra.W_beta.weight.normal_(0, 0.1)
        before = None  # keep masks before the layer being calibrated
        for ell in plugins.placement.pruning_layers:  # one layer at a time, in order
            pr = plugins.pruner[str(ell)]
            pr.beta.zero_()
            out = mask_route_forward(model, plugins, inputs)
            before = out.batch.slot_valid.float() if before is None else before
            mids = [out.z[ell][b][before[b] > 0.5].median() for b in range(before.shape[0])]
            pr.beta.fill_(-float(torch.stack(mids).mean()))
            before = mask_route_forward(model, plugins, inputs).masks[ell]
    return plugins


def _save(plugins: RCPPlugins, fam: str, rho: float, path, a: float | None = None):
    if a is not None:
        plugins = _copy(plugins)
        with torch.no_grad():
            for dra in plugins.dra.values():
                dra.a.fill_(a)
    meta = {"model_class": CLASSES[fam], "budget": rho * 576, "rho": rho, "delta": 0.0, "tau_eval": 0.2, "theta": 0.5}
    return str(save_checkpoint(path, plugins, meta))


def _copy(plugins: RCPPlugins) -> RCPPlugins:
    new = RCPPlugins(plugins.hidden_size, plugins.placement, **{k: plugins.dims[k] for k in plugins.dims})
    new.load_state_dict(plugins.state_dict())
    return new.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{(family, rho): (plugins, checkpoint dir, the same with a = 0)}, built on first use."""
    made: dict = {}

    def get(fam: str, rho: float):
        if (fam, rho) not in made:
            plugins = _plugins(fam, rho)
            root = tmp_path_factory.mktemp(f"rcp-{fam}-{len(made)}")
            a0 = _save(plugins, fam, rho, root / "a0", 0.0)
            made[fam, rho] = (plugins, _save(plugins, fam, rho, root / "a1"), a0)
        return made[fam, rho]

    return get


def _masks(record, layers, n: int) -> dict:
    """{ℓ: (B, N) cumulative keep masks} from a run record's events (one image per sample)."""
    out = {}
    for s, ell in enumerate(layers):
        c = torch.zeros(len(record.samples), n)
        for b, sample in enumerate(record.samples):
            c[b, sample.events[s].keep_idx] = 1.0
        out[ell] = c
    return out


@pytest.mark.parametrize(
    "fam,rho",  # pruning layers (1, 3, 5) and (0, 2, 5) on 6 layers
    [("llava", 1 / 3), ("llava", 1 / 9), ("llava_next", 1 / 3)],
)
def test_property8_physical_route_equals_mask_route(ckpts, fam, rho):
    plugins, path, path_a0 = ckpts(fam, rho)
    f = family(fam)
    model, inputs = f.models["sdpa"], f.batches[2]
    layers = plugins.placement.pruning_layers
    with vtprune.pruned(model, "rcp", rho, checkpoint=path), torch.no_grad():
        phys = model(**inputs).logits[:, -1]
        record = vtprune.last_run(model)
    with torch.no_grad():
        free = mask_route_forward(model, plugins, inputs)
    masks = _masks(record, layers, free.batch.slot_valid.shape[1])
    kept = [masks[ell].sum(-1) for ell in layers]
    n = free.batch.slot_valid.sum(-1).float()
    for a, b in zip([n, *kept], kept, strict=False):  # tokens really dropped at every layer, in every sample
        assert torch.all(b < a) and torch.all(b >= 1)
    with torch.no_grad():
        forced = mask_route_forward(model, plugins, inputs, forced_masks=masks)
    assert (phys - forced.logits[:, -1]).abs().max() <= TOL
    assert all(torch.equal(free.masks[ell], masks[ell]) for ell in layers), "the routes took different decisions"
    # the repair matters: the same run with a = 0 gives other next-token logits
    with vtprune.pruned(model, "rcp", rho, checkpoint=path_a0), torch.no_grad():
        plain = model(**inputs).logits[:, -1]
    assert (plain - phys).abs().max() > 1e-3


def test_repair_touches_only_generation_rows(ckpts):
    """Prefill logits of every row but the last prompt row equal those of the same pruned run with a = 0."""
    _, path, path_a0 = ckpts("llava", 1 / 3)
    f = family("llava")
    model, inputs = f.models["sdpa"], f.batches[2]
    runs = []
    for p in (path, path_a0):
        with vtprune.pruned(model, "rcp", 1 / 3, checkpoint=p), torch.no_grad():
            runs.append(model(**inputs).logits)
            seq = vtprune.last_run(model).sequence_index
    repaired, plain = runs
    valid = seq >= 0
    valid[:, -1] = False
    assert torch.equal(repaired[valid], plain[valid])
    assert not torch.equal(repaired[:, -1], plain[:, -1])


@pytest.mark.parametrize("fam,rho", [("llava", 1 / 3), ("llava", 1 / 9), ("llava_next", 1 / 3)])
def test_shared_oracles(ckpts, fam, rho):
    """O1 bypass, O3 cached decode == uncached replay (repair at every generation row), batch independence;
    ρ = 1/9 prunes at the input of layer 0 (`llm:0`)."""
    _, path, _ = ckpts(fam, rho)
    record = check_oracles(fam, "rcp", rho, {"checkpoint": path}, selection_only=False)
    assert all(s.layer_avg_tokens < s.n_visual for s in record.samples)


def test_shared_oracles_eager(ckpts):
    _, path, _ = ckpts("llava", 1 / 3)
    check_oracles("llava", "rcp", 1 / 3, {"checkpoint": path}, selection_only=False, attn="eager", bypass=False)


def test_remove_restores_stock_bit_exactly(ckpts):
    _, path, _ = ckpts("llava", 1 / 3)
    f = family("llava")
    model, inputs = f.models["sdpa"], f.batches[2]
    hooks = [(n, list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in model.named_modules()]
    with torch.no_grad():
        before = model(**inputs).logits
    with vtprune.pruned(model, "rcp", 1 / 3, checkpoint=path), torch.no_grad():
        pruned = model(**inputs).logits
    with torch.no_grad():
        after = model(**inputs).logits
    assert pruned.shape[1] < before.shape[1] and torch.equal(before, after)
    assert hooks == [(n, list(m._forward_pre_hooks), list(m._forward_hooks)) for n, m in model.named_modules()]
    assert "generate" not in model.__dict__ and "_vtprune" not in model.__dict__


def test_property2_everything_kept_and_a0_equals_stock(ckpts):
    """δ = +∞ keeps every token and a = 0 makes the repair the identity: the stock model's logits."""
    _, _, path_a0 = ckpts("llava", 1 / 3)
    f = family("llava")
    model, inputs = f.models["sdpa"], f.batches[2]
    with torch.no_grad():
        ref = model(**inputs).logits
    with vtprune.pruned(model, "rcp", 1 / 3, checkpoint=path_a0, delta=float("inf")), torch.no_grad():
        out = model(**inputs).logits
        record = vtprune.last_run(model)
    assert all(len(ev.keep_idx) == 576 for s in record.samples for ev in s.events)
    valid = inputs["attention_mask"].bool()
    assert (out - ref).abs()[valid].max() <= 1e-5


def test_errors(ckpts, tmp_path):
    plugins, path, _ = ckpts("llava", 1 / 3)
    model = family("llava").models["sdpa"]
    with pytest.raises(VtpruneError, match="needs a trained checkpoint"):
        vtprune.apply(model, "rcp", 1 / 3)
    with pytest.raises(VtpruneError, match="no RCP checkpoint"):
        vtprune.apply(model, "rcp", 1 / 3, checkpoint=str(tmp_path / "missing"))
    with pytest.raises(VtpruneError, match="trim_earlier_caches"):
        vtprune.apply(model, "rcp", 1 / 3, checkpoint=path, trim_earlier_caches=True)
    with pytest.raises(BudgetError, match=r"trained for a layer-averaged budget of 192 tokens.*gives 288 tokens"):
        vtprune.apply(model, "rcp", 0.5, checkpoint=path)
    with pytest.raises(BudgetError, match="retained"):
        vtprune.apply(model, "rcp", 1 / 3, checkpoint=path, budget_mode="retained")
    vtprune.remove(vtprune.apply(model, "rcp", 192, checkpoint=path))  # the checkpoint's token budget is fine
    # another architecture: a LLaVA checkpoint on LLaVA-NeXT, and one made for a narrower LLM
    nxt = family("llava_next").models["sdpa"]
    with pytest.raises(UnsupportedModelError, match="trained for LlavaForConditionalGeneration.*LlavaNext"):
        vtprune.apply(nxt, "rcp", 1 / 3, checkpoint=path)
    narrow = RCPPlugins(32, placement_for(6, 1 / 3), d_prime=16, bottleneck=16)
    narrow_path = _save(narrow, "llava", 1 / 3, tmp_path / "narrow")
    with pytest.raises(UnsupportedModelError, match=r"hidden size 32.*hidden size 64"):
        vtprune.apply(model, "rcp", 1 / 3, checkpoint=narrow_path)
    assert "_vtprune" not in model.__dict__


def test_builtin_model_uses_its_shipped_checkpoint():
    """`builtin:shapes-llava` ships a trained checkpoint (64 layer-averaged tokens): `checkpoint` may be omitted."""
    from vtprune.methods.rcp import SHIPPED, shipped_checkpoint
    from vtprune.testbed import load_builtin
    from vtprune.testbed.data import HELDOUT_SEED, balanced_samples
    from vtprune.testbed.evaluate import evaluate

    model, processor = load_builtin("shapes-llava")
    assert shipped_checkpoint(model.name_or_path) == SHIPPED / "shapes-llava"
    assert shipped_checkpoint("some/other-model") is None
    samples = balanced_samples(HELDOUT_SEED, 2)
    with vtprune.pruned(model, "rcp", 64) as m:
        assert vtprune.session_of(m).method.checkpoint == str(SHIPPED / "shapes-llava")
        evaluate(m, processor, samples, batch_size=len(samples))
        counts = [s.layer_avg_tokens for s in vtprune.last_run(m).samples]
    assert all(c < 576 for c in counts) and 16 < sum(counts) / len(counts) < 256
    with pytest.raises(BudgetError, match="trained for a layer-averaged budget of 64") as err:
        with vtprune.pruned(model, "rcp", 32) as m:
            evaluate(m, processor, samples[:1], batch_size=1)
    # the message names the shipped checkpoint by the model, not by this machine's path (it lands in reports)
    assert "checkpoint shipped for builtin:shapes-llava (vtprune/assets/rcp/shapes-llava)" in str(err.value)
    assert str(SHIPPED) not in str(err.value)


def test_a_builtin_model_gets_the_checkpoint_shipped_for_its_budget(ckpts, tmp_path, monkeypatch):
    """A built-in model may ship one checkpoint per budget (`rcp/<NAME>/` and `rcp/<NAME>/budgets/<K>/`): `apply`
    without `checkpoint` binds the one trained for the requested budget (its pruning layers differ), and a budget
    none was trained for names every shipped one."""
    import shutil

    import vtprune.methods.rcp as rcp_method
    import vtprune.shipped as shipped
    from vtprune.models import adapter_for

    f = family("llava")
    model, inputs = f.models["sdpa"], f.batches[2]
    n = adapter_for(model).nominal_visual_tokens()
    root = tmp_path / "rcp"
    shutil.copytree(ckpts("llava", 1 / 3)[1], root / "fake")  # the first one: ρ = 1/3
    k9 = max(1, int(n / 9 + 0.5))
    shutil.copytree(ckpts("llava", 1 / 9)[1], root / "fake" / shipped.RCP_BUDGETS / "64")
    (root / "fake" / shipped.RCP_BUDGETS / "7").mkdir()  # no weights: not a checkpoint, ignored
    monkeypatch.setattr(shipped, "RCP_ASSETS", root)
    monkeypatch.setattr(rcp_method, "SHIPPED", root)
    monkeypatch.setattr(model, "name_or_path", "builtin:fake")
    assert shipped.shipped_rcp_dirs("builtin:fake", "rcp_plugins.safetensors") == [
        root / "fake", root / "fake" / "budgets" / "64"]
    assert shipped.shipped_rcp_dirs("some/model", "rcp_plugins.safetensors") == []
    for budget, layers, where in ((1 / 3, (1, 3, 5), root / "fake"), (1 / 9, (0, 2, 5), root / "fake/budgets/64"),
                                  (k9, (0, 2, 5), root / "fake/budgets/64")):
        with vtprune.pruned(model, "rcp", budget) as m:
            method = vtprune.session_of(m).method
            assert method.checkpoint == str(where)
            assert method.placement.pruning_layers == layers
            assert method.shipped_budgets == [64, 192]
            with torch.no_grad():
                m(**inputs)
            assert all(s.layer_avg_tokens < n for s in vtprune.last_run(m).samples)
    assert "budgets/64" in method.checkpoint_label and str(root) not in method.checkpoint_label
    with pytest.raises(BudgetError, match=r"trained for a layer-averaged budget of 192 .*shipped checkpoints for "
                                          r"64, 192 tokens"):
        vtprune.apply(model, "rcp", 2)
    assert "_vtprune" not in model.__dict__


def test_a_budget_below_what_rcp_reaches_says_so():
    """On the 32-layer v3 model the placement for 16 of 576 tokens prunes first at layer 1, which alone averages
    576/32 = 18 tokens: no checkpoint could serve 16, and the error says that instead of asking for a checkpoint
    trained for it (what `vtprune train-rcp` would refuse with the same count)."""
    from vtprune.rcp.train import check_feasible
    from vtprune.testbed import load_builtin
    from vtprune.testbed.data_v3 import balanced_samples
    from vtprune.testbed.evaluate import evaluate
    from vtprune.testbed.splits import calibration_split

    model, processor = load_builtin("shapes-v3-llava")
    samples = balanced_samples(calibration_split(20037), 1)[:1]
    with pytest.raises(BudgetError, match=r"budget of 16 of 576 visual tokens is below the smallest RCP can reach "
                                          r"on this 32-layer decoder: 19 tokens") as err:
        with vtprune.pruned(model, "rcp", 16) as m:
            evaluate(m, processor, samples, batch_size=1)
    assert "\n" not in str(err.value)
    with pytest.raises(BudgetError, match="19 tokens"):  # the trainer's own rule gives the same count
        check_feasible(placement_for(32, 16 / 576), 16 / 576, 576)
    assert "_vtprune" not in model.__dict__


def test_the_v3_model_ships_a_checkpoint_for_every_budget_rcp_reaches():
    """`builtin:shapes-v3-llava` ships RCP checkpoints for 64 (the first) and 192 / 128 / 32 tokens
    (`budgets/K/`, docs/methods.md); `apply` without a checkpoint binds the one for the requested budget, whose
    pruners then average about that many tokens over the decoder's layers on test questions."""
    from vtprune.methods.rcp import SHIPPED, shipped_checkpoints
    from vtprune.rcp.checkpoint import read_config
    from vtprune.testbed import load_builtin
    from vtprune.testbed.data_v3 import balanced_samples
    from vtprune.testbed.evaluate import evaluate
    from vtprune.testbed.splits import calibration_split

    model, processor = load_builtin("shapes-v3-llava")
    dirs = shipped_checkpoints(model.name_or_path)
    budgets = {round(read_config(d)["budget"]): d for d in dirs}
    assert sorted(budgets) == [32, 64, 128, 192] and dirs[0] == SHIPPED / "shapes-v3-llava"
    samples = balanced_samples(calibration_split(20037), 1)
    for k, d in budgets.items():
        with vtprune.pruned(model, "rcp", k) as m:
            assert vtprune.session_of(m).method.checkpoint == str(d)
            evaluate(m, processor, samples, batch_size=len(samples))
            counts = [s.layer_avg_tokens for s in vtprune.last_run(m).samples]
        assert 0.5 * k < sum(counts) / len(counts) < 1.5 * k, (k, counts)
    assert "_vtprune" not in model.__dict__
