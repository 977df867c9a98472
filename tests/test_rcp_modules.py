"""RCP plug-ins, placement, schedules, losses and the mask route (spec rcp.md; properties 1-7 and 9).

Property 8 (physical route == mask route) is tested with the engine integration; here the mask route is
checked against an independent explicit layer loop with masked keys (same decisions), which is what the
physical route must reproduce.
"""

from __future__ import annotations

import math

import pytest
import torch
from factories import PROMPTS

from vtprune.errors import UnsupportedModelError
from vtprune.rcp.losses import moment_loss, repair_loss, sparsity_loss, task_loss
from vtprune.rcp.mask_route import _rcp_attention, mask_route_forward, prepare_batch, student_forward
from vtprune.rcp.modules import (
    ContextEncoder,
    CrossAttentionPruner,
    DelayedRepairAdapter,
    RCPPlugins,
    centred_baseline,
    count_parameters,
    inference_mask,
    mask_step,
    table_coords,
    training_mask,
)
from vtprune.rcp.placement import Placement, placement_for, round_half_up
from vtprune.rcp.schedule import gumbel_schedule, lr_factor, sparsity_target
from vtprune.testing import llava_inputs, tiny_llava

torch.set_num_threads(1)


def _slots(B=2, N=12, d=16, Lq=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q2v = torch.rand(B, N, generator=g).softmax(-1)
    V = torch.randn(B, N, d, generator=g)
    Hq = torch.randn(B, Lq, d, generator=g)
    q_valid = torch.ones(B, Lq, dtype=torch.bool)
    q_valid[1, 3:] = False
    c = torch.ones(B, N)
    c[0, :3] = 0
    return q2v, V, Hq, q_valid, c


# --- shapes, inits, parameter counts ---------------------------------------------------------------------
def test_pruner_context_dra_shapes_and_inits():
    torch.manual_seed(0)
    d, dp, b = 64, 32, 24
    pr = CrossAttentionPruner(d, d_prime=dp)
    bound = 0.1 * math.sqrt(6 / (d + dp))  # xavier_uniform gain 0.1
    assert pr.W_v.weight.abs().max() <= bound + 1e-7 and pr.W_v.weight.shape == (dp, d)
    assert pr.Q_p.shape == (16, dp) and 0.01 < pr.Q_p.std() < 0.03
    assert torch.all(pr.agg.weight == 1 / 16) and torch.all(pr.agg.bias == 0)
    assert torch.all(pr.mlp[-1].weight == 0) and torch.all(pr.mlp[-1].bias == 0)
    assert isinstance(pr.mlp[3], torch.nn.Dropout) and pr.mlp[3].p == 0.2 and pr.query_dropout == 0.2
    assert float(pr.beta.detach()) == 2.0 and pr.mha.num_heads == 4 and pr.mha.batch_first
    ctx = ContextEncoder(d, bottleneck=b)
    assert ctx.P.shape == (24, 24, 64) and ctx.q.shape == (64,)
    assert ctx.W_m.weight.abs().max() <= 0.1 * math.sqrt(6 / (64 + b)) + 1e-7
    assert ctx.W_p.weight.abs().max() <= 0.1 * math.sqrt(6 / (d + b)) + 1e-7
    dra = DelayedRepairAdapter(d, bottleneck=b)
    for lin in (dra.W_gamma, dra.W_beta):
        assert torch.all(lin.weight == 0) and torch.all(lin.bias == 0)
    assert dra.W_up.weight.abs().max() <= 0.1 * math.sqrt(6 / (d + b)) + 1e-7
    assert float(dra.a.detach()) == pytest.approx(0.1)

    q2v, V, Hq, q_valid, c = _slots(d=d)
    pr.eval()
    z = pr(q2v, V, Hq, q_valid, c)
    assert z.shape == (2, 12) and z.dtype == torch.float32
    pos = table_coords(torch.stack([torch.arange(12) // 4, torch.arange(12) % 4], 1), torch.zeros(12).long(), [(3, 4)])
    e_mask, e_pruned = ctx(c, pos.expand(2, -1, -1), torch.randn(2, 12, d))
    assert e_mask.shape == e_pruned.shape == (2, b)
    x = torch.randn(2, 7, d)
    assert dra(x, e_mask, e_pruned, torch.zeros(2, 7, dtype=torch.bool)).shape == x.shape


def test_parameter_counts_llava_7b_widths_and_artefact_keys():
    """≈ 5.52 M per pruner, ≈ 2.17 M context, ≈ 6.82 M per DRA, ≈ 32.4 M in all at d = 4096 (spec §A)."""
    plugins = RCPPlugins(4096, placement_for(32, 64 / 576))
    assert round(count_parameters(plugins.pruner["1"]) / 1e6, 2) == 5.52
    assert round(count_parameters(plugins.context) / 1e6, 2) == 2.17
    assert round(count_parameters(plugins.dra["22"]) / 1e6, 2) == 6.82
    assert count_parameters(plugins) == 32_369_787
    keys = plugins.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"pruner", "context", "dra"}
    assert {k.split(".")[1] for k in keys if k.startswith("pruner.")} == {"1", "13", "25"}
    assert {k.split(".")[1] for k in keys if k.startswith("dra.")} == {"22", "29"}
    assert "context.P" in keys and "pruner.13.beta" in keys and "dra.29.a" in keys


# --- placement --------------------------------------------------------------------------------------------
def test_placement_reproduces_the_spec_tables():
    llava = {
        192: ((4, 14, 24), {22: 14, 29: 24}),
        128: ((4, 14, 24), {22: 14, 29: 24}),
        64: ((1, 13, 25), {22: 13, 29: 25}),
    }
    for budget, (prune, source) in llava.items():
        p = placement_for(32, budget / 576)
        assert p.pruning_layers == prune and p.repair_layers == (22, 29) and p.source_map == source
    for rho, prune, source in (
        (1 / 3, (4, 12, 21), {19: 12, 25: 21}),
        (2 / 9, (4, 12, 21), {19: 12, 25: 21}),
        (1 / 9, (1, 11, 22), {19: 11, 25: 22}),
    ):
        p = placement_for(28, rho)  # Qwen2.5-VL: round_half_up(ℓ·28/32)
        assert p.pruning_layers == prune and p.repair_layers == (19, 25) and p.source_map == source
    for rho in (640 / 2880, 320 / 2880, 160 / 2880):  # LLaVA-NeXT: same layers by budget column
        want = (4, 14, 24) if rho > 1 / 6 else (1, 13, 25)
        assert placement_for(32, rho).pruning_layers == want
    assert placement_for(32, 16 / 576).pruning_layers == (1, 13, 25)
    assert round_half_up(3.5) == 4 and round_half_up(2.4999) == 2


def test_placement_shallow_models_rule_and_refusal():
    p6 = placement_for(6, 1 / 9)
    assert (p6.pruning_layers, p6.repair_layers, p6.source_map) == ((0, 2, 5), (4, 5), {4: 2, 5: 5})
    p3 = placement_for(3, 1 / 9)  # the built-in model: repair layers collapse into one DRA after layer 2
    assert (p3.pruning_layers, p3.repair_layers, p3.source_map) == ((0, 1, 2), (2,), {2: 2})
    for L in range(3, 41):
        for rho in (1 / 3, 1 / 9):
            p = placement_for(L, rho)
            assert list(p.pruning_layers) == sorted(set(p.pruning_layers)) and p.pruning_layers[-1] < L
            assert all(p.source_map[r] <= r < L for r in p.repair_layers)
    with pytest.raises(UnsupportedModelError, match="at least 3 decoder layers"):
        placement_for(2, 1 / 9)


def test_property6_layer_average_by_hand():
    """Property 6: layers 4/14/24 of 32, kept 0.6/0.075/0.016 -> r̄ = (4 + 10·0.6 + 10·0.075 + 8·0.016)/32."""
    p = placement_for(32, 1 / 3)
    assert p.segment_lengths() == [10, 10, 8]
    assert p.layer_average([0.6, 0.075, 0.016]) == pytest.approx((4 + 6 + 0.75 + 0.128) / 32)
    assert p.layer_average([0.6021, 0.0747, 0.0156]) * 576 == pytest.approx(196.07, abs=0.01)  # spec's "196"
    assert Placement.from_dict(p.to_dict()) == p
    assert sparsity_loss(torch.tensor(0.3), 0.25) == pytest.approx(0.05)


# --- masks -----------------------------------------------------------------------------------------------
def test_property7_straight_through_values_and_gradient():
    torch.manual_seed(0)
    z = torch.randn(3, 50, requires_grad=True)
    u = torch.rand(3, 50)
    for noise in (True, False):
        m = training_mask(z, 0.7, noise, u)
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
        eps = (u.log() - (-u).log1p()) if noise else 0
        w = torch.randn(3, 50)
        (g,) = torch.autograd.grad((m * w).sum(), z)
        (g_ref,) = torch.autograd.grad((torch.sigmoid((z + eps) / 0.7) * w).sum(), z)
        assert torch.allclose(g, g_ref, atol=1e-7)


def test_property3_centred_baseline_and_tau_independent_inference_mask():
    q2v, _, _, _, c = _slots()
    valid = torch.ones_like(c, dtype=torch.bool)
    valid[1, -2:] = False
    b = centred_baseline(q2v, c, valid)
    assert torch.allclose((b * c * valid).sum(-1), torch.zeros(2), atol=1e-5)
    z = torch.cat([torch.randn(4, 64) * 3, torch.tensor([[0.0, 1e-9, -1e-9, 1e-30] * 16])])
    ref = inference_mask(z, 0.3, tau_eval=0.2)
    for tau in (1e-3, 0.05, 1.0, 50.0):
        assert torch.equal(inference_mask(z, 0.3, tau_eval=tau), ref)
    assert torch.equal(inference_mask(z, float("inf")), torch.ones_like(z))


def test_property1_cumulative_masks_never_increase_and_never_empty():
    torch.manual_seed(0)
    c = torch.ones(3, 40)
    valid = torch.ones(3, 40, dtype=torch.bool)
    valid[2, 30:] = False
    for _ in range(4):
        z = torch.randn(3, 40)
        z[1] = -5.0  # drops everything: the guard keeps argmax z over the kept slots
        m, new = mask_step(inference_mask(z), z, c, valid)
        assert torch.all(new <= c) and torch.all(new[~valid] == 0) and torch.all(new.sum(-1) >= 1)
        assert torch.equal(new, c * m)
        kept_best = z.masked_fill((c < 0.5) | ~valid, float("-inf")).argmax(-1)
        assert new[1, kept_best[1]] == 1 and new[1].sum() == 1
        c = new


def test_property9_pruner_logits_permutation_equivariant():
    torch.manual_seed(0)
    pr = CrossAttentionPruner(16, d_prime=32).eval()
    with torch.no_grad():
        pr.mlp[-1].weight.normal_()  # make every term non-trivial
    q2v, V, Hq, q_valid, c = _slots()
    perm = torch.randperm(12)
    z = pr(q2v, V, Hq, q_valid, c)
    zp = pr(q2v[:, perm], V[:, perm], Hq, q_valid, c[:, perm])
    assert torch.allclose(zp, z[:, perm], atol=1e-5)
    V2 = V.clone()
    V2[c < 0.5] = 100.0  # rows of dropped slots do not matter for the kept slots
    assert torch.allclose(pr(q2v, V2, Hq, q_valid, c)[c > 0.5], z[c > 0.5], atol=1e-5)


def test_context_positions_and_dropped_rows():
    torch.manual_seed(0)
    ctx = ContextEncoder(8, bottleneck=6)
    r = torch.arange(576)
    pos = table_coords(torch.stack([r // 24, r % 24], 1), torch.zeros(576).long(), [(24, 24)])
    assert torch.equal(ctx.positional(pos[None])[0], ctx.P.reshape(576, 64))  # exact rows of the 24×24 table
    r7 = torch.arange(35)
    xy = torch.stack([r7 // 5, r7 % 5], 1)  # another grid: bilinear as grid_sample(align_corners=False)
    norm = (xy.float() + 0.5) / torch.tensor([7.0, 5.0]) * 2 - 1
    ref = torch.nn.functional.grid_sample(
        ctx.P.permute(2, 0, 1)[None], norm.flip(-1)[None, None], align_corners=False, padding_mode="border"
    )[0, :, 0].T
    got = ctx.positional(table_coords(xy, torch.zeros(35).long(), [(7, 5)])[None])[0]
    assert torch.allclose(got, ref, atol=1e-4)
    c = torch.ones(1, 576)
    c[0, :10] = 0
    vdrop = torch.zeros(1, 576, 8)
    vdrop[0, :10] = torch.randn(10, 8)
    _, e_pruned = ctx(c, pos[None], vdrop)
    assert torch.allclose(e_pruned, ctx.W_p(vdrop[0, :10].mean(0, keepdim=True)), atol=1e-6)
    _, none_dropped = ctx(torch.ones(1, 576), pos[None], vdrop)
    assert torch.allclose(none_dropped, ctx.W_p.bias[None], atol=1e-7)


def test_property4_dra_only_touches_generation_positions():
    torch.manual_seed(0)
    dra = DelayedRepairAdapter(16, bottleneck=8)
    with torch.no_grad():
        dra.W_gamma.weight.normal_()
        dra.W_beta.weight.normal_()
    x = torch.randn(2, 9, 16)
    gate = torch.zeros(2, 9, dtype=torch.bool)
    gate[0, 8], gate[1, 5:8] = True, True
    e1, e2 = torch.randn(2, 8), torch.randn(2, 8)
    y = dra(x, e1, e2, gate)
    assert torch.equal(y[~gate], x[~gate]) and not torch.allclose(y[gate], x[gate])
    with torch.no_grad():
        dra.a.zero_()
    assert torch.equal(dra(x, e1, e2, gate), x)


# --- losses and schedules --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["teacher_std", "none"])
def test_property5_repair_loss_zero_and_permutation_invariant(norm):
    torch.manual_seed(0)
    h = torch.randn(30, 16)
    assert float(moment_loss(h, h.clone(), norm=norm)) == 0.0
    o = torch.randn(25, 16) * 2 + 1
    perm = torch.randperm(30)
    assert torch.allclose(moment_loss(h[perm], o, norm=norm), moment_loss(h, o, norm=norm), atol=1e-6)
    assert torch.allclose(moment_loss(h, o[torch.randperm(25)], norm=norm), moment_loss(h, o, norm=norm), atol=1e-5)
    sd = o.std(0, correction=0) + 1e-6 if norm == "teacher_std" else torch.ones(16)
    hs, os_ = h / sd, o / sd
    mu = (hs.mean(0) - os_.mean(0)).square().mean()
    var = ((hs.var(0, unbiased=False) - os_.var(0, unbiased=False)).square()).mean()
    assert torch.allclose(moment_loss(h, o, norm=norm), mu + 3 * var, atol=1e-5)
    both = repair_loss({4: h, 5: h * 2}, {4: o, 5: h * 2}, gather=False, norm=norm)
    assert torch.allclose(both, moment_loss(h, o, norm=norm) / 2)


def test_task_loss_is_per_sample_mean_then_batch_mean():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    sample = torch.tensor([0, 0, 0, 1])
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(task_loss(logits, targets, sample, 2), (ce[:3].mean() + ce[3]) / 2)


def test_schedules():
    assert gumbel_schedule(0, 100) == (1.5, True)
    tau, on = gumbel_schedule(30, 100)
    assert tau == pytest.approx(0.85) and on
    assert gumbel_schedule(60, 100) == (0.2, True) and gumbel_schedule(79, 100) == (0.2, True)
    assert gumbel_schedule(80, 100) == (0.2, False) and gumbel_schedule(99, 100) == (0.2, False)
    rho = 1 / 9
    assert sparsity_target(0, 100, rho) == pytest.approx(1.0)
    assert sparsity_target(5, 100, rho) == pytest.approx((1 + rho) / 2)
    assert sparsity_target(10, 100, rho) == rho and sparsity_target(99, 100, rho) == rho
    lrs = [lr_factor(s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and min(lrs) >= 0.1 - 1e-12


# --- explicit attention ----------------------------------------------------------------------------------
def test_column_weighted_attention_equals_masking_the_keys():
    """Post-softmax × c renormalised == attention over the kept keys only (for 0/1 c)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal, training, layer_idx = 2, True, False, 0

    B, H, T, dh = 2, 4, 11, 8
    q, k, v = torch.randn(B, H, T, dh), torch.randn(B, 2, T, dh), torch.randn(B, 2, T, dh)
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :2] = False
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal[None, None] & pad[:, None, None, :]
    keep = torch.ones(B, T)
    keep[0, 3:6], keep[1, 4] = 0, 0
    ref, _ = sdpa_attention_forward(Attn(), q, k, v, mask & keep.bool()[:, None, None, :], scaling=dh**-0.5)
    rows = pad.clone()
    rows[0, 3:6] = False  # rows that see no kept key except themselves-masked are undefined in the reference
    fast, _ = _rcp_attention(Attn(), q, k, v, mask, scaling=dh**-0.5, base="sdpa", rcp_keep=keep)  # no grad: fused
    assert torch.allclose(fast[rows], ref[rows], atol=1e-6) and torch.isfinite(fast).all()
    ste = keep.clone().requires_grad_(True)  # gradient w.r.t. keep wanted: explicit weights × keep, renormalised
    out, weights = _rcp_attention(Attn(), q, k, v, mask, scaling=dh**-0.5, base="sdpa", rcp_keep=ste)
    assert torch.allclose(out[rows], ref[rows], atol=1e-6)
    assert torch.all(weights.permute(0, 3, 1, 2)[keep == 0] == 0)  # (B, T, H, q): dropped key columns
    out.square().sum().backward()
    assert torch.isfinite(ste.grad).all() and ste.grad[0, 3:6].abs().sum() > 0  # dropped keys get a gradient
    plain, _ = _rcp_attention(Attn(), q, k, v, mask, scaling=dh**-0.5, base="sdpa")  # no kwarg: the base
    assert torch.equal(plain, sdpa_attention_forward(Attn(), q, k, v, mask, scaling=dh**-0.5)[0])


# --- the mask route on a tiny LLaVA ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava():
    model = tiny_llava(attn="eager", layers=6).requires_grad_(False)  # frozen, as in training
    return model, llava_inputs(model, PROMPTS, seed=3)


def _plugins(hidden, L=6, rho=1 / 3, seed=0):
    torch.manual_seed(seed)
    return RCPPlugins(hidden, placement_for(L, rho), d_prime=32, bottleneck=24)


def test_property2_everything_kept_and_a0_equals_frozen_model(llava):
    model, inputs = llava
    plugins = _plugins(64)
    with torch.no_grad():
        ref = model(**inputs).logits
    hooks = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    with torch.no_grad():
        for dra in plugins.dra.values():
            dra.a.zero_()
        valid = inputs["attention_mask"].bool()
        out = mask_route_forward(model, plugins, inputs, delta=float("inf"))
        assert all(bool(torch.all(c == 1)) for c in out.masks.values())
        assert (out.logits - ref).abs()[valid].max() < 1e-5
        for pr in plugins.pruner.values():
            pr.beta.fill_(float("inf"))
        out = mask_route_forward(model, plugins, inputs)
        assert all(bool(torch.all(c == 1)) for c in out.masks.values())
        assert (out.logits - ref).abs()[valid].max() < 1e-5
    assert model.config.text_config._attn_implementation == "eager"  # restored
    assert hooks == {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


def _rope(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos[:, None] + torch.cat([-t[..., half:], t[..., :half]], -1) * sin[:, None]


def _reference_loop(model, inputs, out, plugins):
    """Independent explicit layer loop (eager layers, hand-built additive masks): a slot dropped at pruning layer
    ℓ is an invisible key from layer ℓ on; q2v at ℓ from the previous masks; DRA after the repair layers."""
    lm = model.model.language_model
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    B, T = ids.shape
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    h = lm.embed_tokens(ids)
    h = h.masked_scatter((ids == model.config.image_token_id)[..., None], torch.cat(list(feats)))
    pos = (am.cumsum(-1) - 1).clamp(min=0) * am
    cos, sin = lm.rotary_emb(h, pos)
    rb, placement = out.batch, plugins.placement
    dropped = torch.zeros(B, T, dtype=torch.bool)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    q2v = {}
    for i, layer in enumerate(lm.layers):
        if i in placement.pruning_layers:
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(B, T, -1, a.head_dim).transpose(1, 2)
            k = a.k_proj(x).view(B, T, -1, a.head_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin).repeat_interleave(a.num_key_value_groups, 1)
            s = (q @ k.transpose(-1, -2)) * a.scaling
            visible = causal[None] & am.bool()[:, None, :] & ~dropped[:, None, :]
            p = s.masked_fill(~visible[:, None], float("-inf")).softmax(-1).mean(1)  # (B, T, T)
            rows = [p[b, rb.q_rows[b][rb.q_valid[b]]][:, rb.visual_rows[b]].mean(0) for b in range(B)]
            q2v[i] = torch.stack(rows)
            c = out.masks[i]
            for b in range(B):
                dropped[b, rb.visual_rows[b][c[b] == 0]] = True
        visible = causal[None] & am.bool()[:, None, :] & ~dropped[:, None, :]
        add = torch.zeros(B, 1, T, T).masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
        h = layer(h, attention_mask=add, position_embeddings=(cos, sin), position_ids=pos)
        if i in placement.repair_layers:
            h = plugins.repair(i, h, out.state.ctx[placement.source_map[i]], rb.gen)
    return model.lm_head(lm.norm(h)), q2v


@pytest.mark.parametrize("rho", [1 / 3, 1 / 9])
def test_mask_route_equals_explicit_masked_reference(llava, rho):
    """Same decisions => mask route logits == an independent loop in which dropped keys are masked; q2v at each
    pruning layer is read with the previous masks (properties 1 and the basis of 8)."""
    model, inputs = llava
    plugins = _plugins(64, rho=rho, seed=1)
    with torch.no_grad():
        for pr in plugins.pruner.values():
            pr.beta.fill_(-0.3)
            pr.mlp[-1].weight.normal_(0, 0.5)
        out = mask_route_forward(model, plugins, inputs)
        layers = plugins.placement.pruning_layers
        kept = [out.masks[ell].sum(-1) for ell in layers]
        assert all(torch.all(b <= a) for a, b in zip(kept, kept[1:], strict=False)) and bool(torch.all(kept[-1] >= 1))
        assert bool(torch.all(kept[-1] < 576))
        for a, b in zip(layers, layers[1:], strict=False):
            assert torch.all(out.masks[b] <= out.masks[a])
        ref, q2v = _reference_loop(model, inputs, out, plugins)
    valid = inputs["attention_mask"].bool()
    assert (out.logits - ref).abs()[valid].max() < 1e-4
    for ell in layers:
        assert torch.allclose(out.q2v[ell], q2v[ell], atol=1e-6)
    with torch.no_grad():  # replaying the decisions reproduces the run
        replay = mask_route_forward(model, plugins, inputs, forced_masks={ell: out.masks[ell] for ell in layers})
    assert torch.equal(replay.logits, out.logits)
    if rho < 0.2:  # with gradients the explicit (column-weighted) attention runs: same masks, same logits
        with torch.enable_grad():
            grad_out = mask_route_forward(model, plugins, inputs)
        assert all(torch.equal(grad_out.masks[ell], out.masks[ell]) for ell in layers)
        assert (grad_out.logits.detach() - out.logits).abs()[valid].max() < 1e-5


def test_training_mode_gradients_reach_every_plugin(llava):
    model, inputs = llava
    plugins = _plugins(64, rho=1 / 9, seed=2).train()
    gen = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    gen[:, -3:] = True
    rb = prepare_batch(
        model, inputs["input_ids"], inputs["attention_mask"], {"pixel_values": inputs["pixel_values"]}, gen=gen
    )
    hidden, st = student_forward(model, plugins, rb, train=True, tau=1.0, noise_on=True)
    assert all(set(st.masks[ell].unique().tolist()) <= {0.0, 1.0} for ell in st.masks)
    logits = model.get_output_embeddings()(hidden[rb.gen])
    r_bar = plugins.placement.layer_average([st.ratios[ell].mean() for ell in plugins.placement.pruning_layers])
    loss = logits.logsumexp(-1).mean() + sum(v.square().mean() for v in st.repair.values()) + r_bar
    loss.backward()
    missing = [n for n, p in plugins.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert all(".mha.out_proj." in n for n in missing), missing  # only the unused MHA output projection
    params = dict(plugins.named_parameters())
    for name in ("pruner.0.Q_p", "pruner.2.W_v.weight", "pruner.5.beta", "dra.4.W_gamma.weight", "dra.5.a"):
        assert params[name].grad.abs().sum() > 0, name
    # the context reaches the loss only through W_γ / W_β, which start at zero: its gradient starts at zero
    assert params["context.P"].grad.abs().sum() == 0 and params["context.W_p.weight"].grad is not None
    assert all(p.grad is None for p in model.parameters())


def test_mask_route_llava_next_slots_exclude_newlines():
    from vtprune.testing import llava_next_inputs, tiny_llava_next

    model = tiny_llava_next(layers=6)
    inputs = llava_next_inputs(model, PROMPTS, [(100, 160), (112, 60)], seed=1)
    plugins = _plugins(64, rho=1 / 9)
    with torch.no_grad():
        ref = model(**inputs).logits
        for dra in plugins.dra.values():
            dra.a.zero_()
        out = mask_route_forward(model, plugins, inputs, delta=float("inf"))
        assert out.batch.slot_valid.sum(-1).tolist() == [64, 48]  # newlines are not slots
        valid = inputs["attention_mask"].bool()
        assert (out.logits - ref).abs()[valid].max() < 1e-5
        out = mask_route_forward(model, plugins, inputs, delta=-2.5)
    masks = [out.masks[ell] for ell in plugins.placement.pruning_layers]
    assert all(torch.all(m[~out.batch.slot_valid] == 0) for m in masks)
    assert all(torch.all(b <= a) for a, b in zip(masks, masks[1:], strict=False))


def test_mask_route_refuses_qwen():
    from vtprune.testing import qwen_inputs, tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl(layers=6)
    inputs = qwen_inputs(model, PROMPTS[:1], [(112, 168)])
    with pytest.raises(UnsupportedModelError, match="Qwen2.5-VL"):
        mask_route_forward(model, _plugins(64), inputs)
