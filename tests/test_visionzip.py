"""VisionZip (visionzip.md): every "Properties a test can check" item, naive references from hooked CLIP
feature-layer outputs of the tiny LLaVA / LLaVA-NeXT, the engine's inserted-token support (the CLIP [CLS]
token: positions, counts, records, labels, reference order), the shared oracles on the three families, and
VisPruner's similarity on the pre-projector features (its shared oracles run in test_method_oracles.py).

Spec property -> test:
1. K_dom + K_ctx outputs, [CLS] among them: test_method_counts_and_cls, test_multi_view_quotas_and_cls_per_view,
   test_llava_end_to_end_equals_naive_reference, test_next_cls_per_tile_and_positions
2. dominant = top-(K_dom − 1), evenly spaced targets: test_crop_matches_naive_reference, test_method_counts_and_cls
3. one target per token, the merge formula, an empty target keeps its feature: test_crop_matches_naive_reference,
   test_target_without_members_keeps_its_feature, test_llava_end_to_end_equals_naive_reference
   (projector(F[target] + mean F[assigned]) from the hooked feature layer)
4. K_ctx = 0 => pure [CLS]-attention selection: test_no_contextual_is_pure_cls_attention_selection
5. reference order and contiguous ids: test_reference_order_layout, test_llava_reference_preset_order_and_ids,
   test_next_reference_order
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from factories import grid_layout, image_tokens
from families import FAMILIES, check_oracles, family, recorded_plans
from oracles import generate_logits

import vtprune
from vtprune.engine.sequence import compact_rows, copy_rank
from vtprune.errors import VtpruneError
from vtprune.methods import KeepPlan, PruningMethod, Stage, build_method, stable_topk
from vtprune.methods.visionzip import split_budget, visionzip_crop
from vtprune.methods.vispruner import vispruner_crop
from vtprune.models import adapter_for

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ helpers
def _image(grids=((24, 24),), c=12, d=16, dh=5, seed=0, tiles=None, clip=True):
    """Hand-built ImageTokens with every VisionZip signal; `project` is a fixed random token-wise MLP C -> D."""
    g = torch.Generator().manual_seed(seed)
    _, crop, n = grid_layout(grids)
    tile = None if tiles is None else torch.tensor(tiles)
    views = int((tile if tile is not None else crop).max()) + 1
    w1, w2 = torch.randn(c, d, generator=g), torch.randn(d, d, generator=g)
    signals = {
        "cls_attention": torch.rand(n, generator=g).softmax(0),
        "vision_head_keys": torch.randn(n, dh, generator=g),
    }
    vis = torch.randn(n, c, generator=g)
    project = None
    if clip:
        signals["vision_features"] = vis
        signals["vision_cls_features"] = torch.randn(views, c, generator=g)
        project = lambda x: F.gelu(x @ w1) @ w2  # noqa: E731
        feats = project(vis)
    else:
        feats = torch.randn(n, d, generator=g)
    return image_tokens(grids, feats=feats, signals=signals, seed=seed, tile=tile, project=project)


def _naive_crop(feats, metric, scores, n_dom, k_ctx, merge="reference"):
    """visionzip.md pseudo-code in plain Python over the patches of one view (no [CLS] row):
    -> (dominant patch indices, {target: merged row}, [targets])."""
    n = len(scores)
    dom = sorted(sorted(range(n), key=lambda i: (-float(scores[i]), i))[:n_dom])
    rest = [i for i in range(n) if i not in dom]
    if k_ctx == 0:
        return dom, {}, []
    step = max(1, len(rest) // k_ctx)
    tgt = list(range(0, len(rest), step))[:k_ctx]
    m = [metric[i] / metric[i].norm() for i in range(n)]
    groups = {u: [] for u in range(k_ctx)}
    for p in range(len(rest)):
        if p in tgt:
            continue
        sims = [float(m[rest[p]] @ m[rest[t]]) for t in tgt]
        groups[max(range(k_ctx), key=lambda u: (sims[u], -u))].append(rest[p])
    ctx = {}
    for u, t in enumerate(tgt):
        members = [feats[j] for j in groups[u]]
        if merge == "reference":
            extra = torch.stack(members).mean(0) if members else torch.zeros_like(feats[0])
            ctx[rest[t]] = feats[rest[t]] + extra
        else:
            ctx[rest[t]] = torch.stack([feats[rest[t]], *members]).mean(0)
    return dom, ctx, [rest[t] for t in tgt]


@contextmanager
def _lm_inputs(model):
    """Capture every call's language-model inputs: [(inputs_embeds, position_ids, attention_mask)]."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs["inputs_embeds"].detach(), kwargs["position_ids"], kwargs["attention_mask"]))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _clip_reference(model, pixels):
    """Independent CLIP signals of the feature layer: its output (T, 1 + n, C) from a forward hook, [CLS]→patch
    attention (T, n) head mean from an eager run, head-mean keys (T, n, d_h) from a k_proj hook."""
    vt = model.model.vision_tower
    layer = vt.encoder.layers[len(vt.encoder.layers) + model.config.vision_feature_layer]
    out, keys = [], []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: out.append(o)),
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.append(o)),
    ]
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            res = vt(pixels, output_attentions=True)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
        for h in hooks:
            h.remove()
    idx = len(vt.encoder.layers) + model.config.vision_feature_layer
    heads = model.config.vision_config.num_attention_heads
    k = keys[0][:, 1:]
    return out[0], res.attentions[idx][:, :, 0, 1:].mean(1), k.view(*k.shape[:2], heads, -1).mean(2)


def _adapter_signals(model, pixels):
    """What the engine sees on the sdpa tower: the feature layer's output (T, 1 + n, C) and the [CLS]→patch
    attention (T, n) as the LLaVA adapter computes it from its vision pre-hook input."""
    ad = adapter_for(model)
    attn = ad.vision_hook_modules()[0]
    layer = model.model.vision_tower.encoder.layers[len(model.model.vision_tower.encoder.layers) - 2]
    seen, out = [], []
    hooks = [
        attn.register_forward_pre_hook(
            lambda m, args, kw: seen.append(kw.get("hidden_states", args[0] if args else None)), with_kwargs=True
        ),
        layer.register_forward_hook(lambda m, i, o: out.append(o[0] if isinstance(o, tuple) else o)),
    ]
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixels)
            return out[0], ad.vision_signals(attn, seen[0])["cls_attention"]
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------------- unit: the algorithm
def test_split_rule_reproduces_source_rows():
    assert [split_budget(k) for k in (192, 128, 64, 32)] == [(162, 30), (108, 20), (54, 10), (27, 5)]
    assert split_budget(2) == (1, 1) and split_budget(1) == (1, 0)
    assert split_budget(50, 1, 0) == (50, 0)


@pytest.mark.parametrize("merge", ["reference", "mean"])
def test_crop_matches_naive_reference(merge):
    g = torch.Generator().manual_seed(3)
    n, n_dom, k_ctx = 64, 20, 6
    feats, metric, scores = torch.randn(n, 12, generator=g), torch.randn(n, 5, generator=g), torch.rand(n, generator=g)
    dom, tgt, ctx, count = visionzip_crop(feats, metric, scores, n_dom, k_ctx, merge)
    want_dom, want_ctx, want_tgt = _naive_crop(feats, metric, scores, n_dom, k_ctx, merge)
    assert dom.tolist() == want_dom == stable_topk(scores, n_dom).tolist()  # property 2: top by [CLS] attention
    assert tgt.tolist() == want_tgt
    rest = [i for i in range(n) if i not in want_dom]
    step = (n - n_dom) // k_ctx
    assert want_tgt == rest[0 : step * k_ctx : step]  # property 2: evenly spaced in the remaining list
    for t, row in zip(tgt.tolist(), ctx, strict=True):  # property 3: the merge formula
        assert torch.allclose(row, want_ctx[t], atol=1e-5)
    assert float(count.sum()) == n - n_dom - k_ctx  # property 3: every non-target joins exactly one target


def test_target_without_members_keeps_its_feature():
    n = 30
    feats = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    scores = torch.zeros(n)
    scores[:10] = 1.0  # dominant = 0..9; rest = 10..29; step = 20 // 2 = 10: targets 10 and 20
    metric = torch.zeros(n, 2)
    metric[:, 0] = 1.0
    metric[20] = torch.tensor([0.0, 1.0])  # orthogonal to everyone: nobody joins target 20
    dom, tgt, ctx, count = visionzip_crop(feats, metric, scores, 10, 2, "reference")
    assert dom.tolist() == list(range(10)) and tgt.tolist() == [10, 20] and count.tolist() == [18, 0]
    assert torch.equal(ctx[1], feats[20])
    assert torch.allclose(ctx[0], feats[10] + feats[[i for i in range(11, 30) if i != 20]].mean(0), atol=1e-6)


@pytest.mark.parametrize("merge", ["reference", "mean"])
def test_method_counts_and_cls(merge):
    """Property 1 on a CLIP image: K = (K_dom − 1 patches + [CLS]) + K_ctx; the [CLS] token is project(F_cls) at
    the first slot; dominant tokens are the candidates' own projector outputs; contextual = project(merge of F)."""
    img = _image()
    vis, n = img.signals["vision_features"], img.n
    for k, kd in ((192, 162), (128, 108), (64, 54), (2, 1)):
        plan = build_method("visionzip", {"merge": merge}).select(0, img, k)
        assert len(plan.keep_idx) + plan.n_inserted == k and plan.n_inserted == 1
        assert torch.equal(plan.keep_idx, plan.keep_idx.unique()) and plan.new_feats.dtype == img.features.dtype
        assert plan.insert_at.tolist() == [0]
        assert torch.allclose(plan.inserted, img.project(img.signals["vision_cls_features"][:1]), atol=1e-5)
        dom, ctx, tgt = _naive_crop(
            vis, img.signals["vision_head_keys"], img.signals["cls_attention"], kd - 1, k - kd, merge
        )
        assert plan.keep_idx.tolist() == sorted(dom + tgt)
        rows = dict(zip(plan.keep_idx.tolist(), plan.new_feats, strict=True))
        for j in dom:
            assert torch.equal(rows[j], img.features[j])
        for t in tgt:
            assert torch.allclose(rows[t], img.project(ctx[t][None])[0], atol=1e-4)
        assert float(plan.weights.sum()) == n


def test_multi_view_quotas_and_cls_per_view():
    """LLaVA-NeXT-like image: base view + 4 tiles (views by `tile`), per-view quotas, one [CLS] per view at its
    first candidate, each the projection of that view's own [CLS] row."""
    tiles = [0] * 576 + [1 + (r // 24) * 2 + (c // 24) for r in range(48) for c in range(48)]
    img = _image(grids=((24, 24), (48, 48)), tiles=tiles)
    plan = build_method("visionzip", {}).select(0, img, 160)
    assert len(plan.keep_idx) + plan.n_inserted == 160 and plan.n_inserted == 5
    tile = img.tile
    first = [int((tile == v).nonzero()[0]) for v in range(5)]
    assert plan.insert_at.tolist() == first
    assert torch.allclose(plan.inserted, img.project(img.signals["vision_cls_features"]), atol=1e-5)
    assert [int((tile[plan.keep_idx] == v).sum()) for v in range(5)] == [31] * 5  # 32 per view, [CLS] included
    for v in range(5):  # each view: its own top-26 dominant patches
        idx = (tile == v).nonzero().flatten()
        dom = idx[stable_topk(img.signals["cls_attention"][idx], 26)]
        assert set(dom.tolist()) <= set(plan.keep_idx.tolist())


def test_no_contextual_is_pure_cls_attention_selection():
    """Property 4: K_ctx = 0 -> [CLS] + the top-(K − 1) patches by [CLS] attention, features untouched."""
    img = _image()
    plan = build_method("visionzip", {"contextual": 0}).select(0, img, 64)
    assert torch.equal(plan.keep_idx, stable_topk(img.signals["cls_attention"], 63))
    assert torch.equal(plan.new_feats, img.features[plan.keep_idx]) and plan.n_inserted == 1
    plain = _image(clip=False)  # no [CLS] (Qwen2.5-VL): exactly the top-K
    plan = build_method("visionzip", {"contextual": 0}).select(0, plain, 64)
    assert torch.equal(plan.keep_idx, stable_topk(plain.signals["cls_attention"], 64)) and plan.inserted is None


def test_llm_space_without_clip_signals():
    """Qwen2.5-VL path: no [CLS], all K_dom dominant tokens are patches, merging on the LLM-space features."""
    img = _image(clip=False)
    plan = build_method("visionzip", {}).select(0, img, 64)
    dom, ctx, tgt = _naive_crop(img.features, img.signals["vision_head_keys"], img.signals["cls_attention"], 54, 10)
    assert plan.inserted is None and plan.keep_idx.tolist() == sorted(dom + tgt)
    rows = dict(zip(plan.keep_idx.tolist(), plan.new_feats, strict=True))
    assert all(torch.allclose(rows[t], ctx[t], atol=1e-5) for t in tgt)


def test_reference_order_layout():
    """Property 5 (plan level): [CLS, dominant (raster), contextual (target order)]; NeXT: base view so, then
    every tile's dominant patches (raster), every tile's [CLS], every tile's contextual tokens."""
    img = _image()
    ref = build_method("visionzip", {"preset": "reference"}).select(0, img, 64)
    keep = ref.keep_idx
    _, _, tgt = _naive_crop(
        img.signals["vision_features"], img.signals["vision_head_keys"], img.signals["cls_attention"], 53, 10
    )
    is_ctx = torch.isin(keep, torch.tensor(tgt))
    want = [63] + (~is_ctx).nonzero().flatten().tolist() + is_ctx.nonzero().flatten().tolist()
    assert ref.order.tolist() == want
    default = build_method("visionzip", {}).select(0, img, 64)
    assert (
        torch.equal(default.keep_idx, keep) and torch.equal(default.new_feats, ref.new_feats) and default.order is None
    )

    tiles = [0] * 16 + [1 + (r // 4) * 2 + (c // 4) for r in range(8) for c in range(8)]
    multi = _image(grids=((4, 4), (8, 8)), tiles=tiles)
    plan = build_method("visionzip", {"preset": "reference", "dominant": 3, "contextual": 1}).select(0, multi, 20)
    k, order = len(plan.keep_idx), plan.order.tolist()
    view, is_ctx = multi.tile[plan.keep_idx], plan.weights > 1  # one target per view: it absorbs the rest
    base_dom = [s for s in range(k) if view[s] == 0 and not is_ctx[s]]
    base_ctx = [s for s in range(k) if view[s] == 0 and is_ctx[s]]
    tile_dom = [s for s in range(k) if view[s] > 0 and not is_ctx[s]]  # ascending slot = tile-grid raster
    tile_ctx = sorted((s for s in range(k) if view[s] > 0 and is_ctx[s]), key=lambda s: int(view[s]))
    assert (k, len(base_dom), len(base_ctx), len(tile_ctx)) == (15, 2, 1, 4)
    assert order == [k] + base_dom + base_ctx + tile_dom + [k + 1, k + 2, k + 3, k + 4] + tile_ctx


def test_signals_follow_capability():
    m = build_method("visionzip", {})
    assert m.signals(0) == {"cls_attention", "vision_head_keys"}  # outside the engine: the minimal set
    m.available_signals = frozenset({"cls_attention", "vision_head_keys", "vision_features", "vision_cls_features"})
    assert m.signals(0) >= {"vision_features", "vision_cls_features"}
    m.available_signals = frozenset({"cls_attention", "vision_keys", "vision_head_keys"})  # Qwen2.5-VL
    assert m.signals(0) == {"cls_attention", "vision_head_keys"}
    v = build_method("vispruner", {})
    v.available_signals = frozenset({"cls_attention", "vision_features"})
    assert v.signals(0) == {"cls_attention", "vision_features"}
    with pytest.raises(VtpruneError):
        build_method("visionzip", {"merge": "sum"})
    with pytest.raises(VtpruneError, match="no preset"):
        build_method("visionzip", {"preset": "paper"})


def test_compact_rows_with_copies():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    gather, valid = compact_rows(keep)  # bool input: unchanged behaviour
    assert gather.tolist() == [[0, 2, 3], [0, 0, 1]] and valid.tolist() == [[True] * 3, [False, False, True]]
    counts = torch.tensor([[2, 0, 1, 1], [0, 1, 0, 2]])
    gather, valid = compact_rows(counts)
    assert gather.tolist() == [[0, 0, 2, 3], [0, 1, 3, 3]] and valid[1].tolist() == [False, True, True, True]
    assert copy_rank(gather, valid).tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]


# ------------------------------------------------------------------------------- engine: errors and guards
class _Inserter(PruningMethod):
    """Keeps the first k − 1 candidates and inserts one zero token before candidate `at`."""

    name = "test_inserter"
    inserts = True
    at = 0
    order = None
    stage = Stage("pre_llm")

    def stages(self):
        return (self.stage,)

    def select(self, stage_index, image, k):
        plan = KeepPlan(
            torch.arange(k - 1), None, None, torch.zeros(1, image.features.shape[1]), torch.tensor([self.at])
        )
        plan.order = self.order
        return plan


def test_engine_refuses_bad_insertions(models, batches):
    model, inputs = models["sdpa"], batches[1]
    with pytest.raises(VtpruneError, match="positions='reindex'"):
        vtprune.apply(model, "visionzip", 64, preset="reference")
    assert vtprune.session_of(model) is None

    class InLLM(_Inserter):
        stage = Stage("llm", 2)

    with pytest.raises(VtpruneError, match="in-LLM stages after inserted tokens"):
        vtprune.apply(model, InLLM(), 64)

    class Undeclared(_Inserter):
        inserts = False

    class BadSlot(_Inserter):
        at = 576

    class Reorders(_Inserter):
        order = torch.arange(64).flip(0)

    for cls, match in ((Undeclared, "inserts = True"), (BadSlot, "insert_at"), (Reorders, "reindex")):
        with vtprune.pruned(model, cls(), 64):
            with pytest.raises(VtpruneError, match=match), torch.no_grad():
                model(**inputs)


# ------------------------------------------------------------------------------ engine: tiny LLaVA-1.5
def _naive_llava(model, inputs, k, order="default"):
    """Per sample: (LM input embeds (T', D), position ids (T',), kept candidate indices, [CLS] slot) built from
    the hooked feature layer output with the spec's pseudo-code and the stock projector."""
    out, cls, keys = _clip_reference(model, inputs["pixel_values"])
    proj = model.model.multi_modal_projector
    embed = model.get_input_embeddings()
    kd, kc = split_budget(k)
    res = []
    for b in range(inputs["input_ids"].shape[0]):
        ids, mask = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        pos = (mask.long().cumsum(0) - 1).clamp(min=0)
        rows = (ids == model.config.image_token_id).nonzero().flatten()
        feats = out[b]  # (1 + 576, C): row 0 the [CLS]
        dom, ctx, tgt = _naive_crop(feats[1:], keys[b], cls[b], kd - 1, kc)
        with torch.no_grad():
            tok = {j: proj(feats[1 + j]) for j in dom} | {t: proj(ctx[t]) for t in tgt}
            cls_tok = proj(feats[0])
            text = embed(ids)
        kept = sorted(tok)
        if order == "default":  # [CLS] at the first visual slot's id, then ascending representative index
            img_rows, img_pos = [cls_tok] + [tok[j] for j in kept], [pos[rows[0]]] + [pos[rows[j]] for j in kept]
        else:  # reference: [CLS, dominant (raster), contextual (target order)], contiguous ids below
            seq = sorted(dom) + tgt
            img_rows, img_pos = [cls_tok] + [tok[j] for j in seq], [pos[rows[0]]] * (1 + len(seq))
        valid = mask.nonzero().flatten()
        pre, post = valid[valid < rows[0]], valid[valid > rows[-1]]
        emb = torch.cat([text[pre], torch.stack(img_rows), text[post]])
        p = torch.cat([pos[pre], torch.stack(img_pos), pos[post]])
        if order != "default":
            p = torch.arange(len(emb))
        res.append((emb, p, kept, len(pre)))
    return res


def _lm_logits(model, emb, pos):
    with torch.no_grad():
        h = model.model.language_model(inputs_embeds=emb[None], position_ids=pos[None]).last_hidden_state
        return model.lm_head(h)[0]


def test_llava_end_to_end_equals_naive_reference(models, batches):
    """Contextual token = projector(F[target] + mean F[assigned]) and [CLS] = projector(F_cls), F the hooked
    feature-layer output; the [CLS] takes the first visual slot's id; records, counts and decode positions."""
    model, inputs = models["sdpa"], batches[2]
    naive = _naive_llava(model, inputs, 64)
    with vtprune.pruned(model, "visionzip", 64), _lm_inputs(model) as calls:
        with torch.no_grad():
            logits = model(**inputs).logits
        rec = vtprune.last_run(model)
        calls.clear()
        tokens, steps = generate_logits(model, inputs, 2)
    emb, pos, mask = calls[0]
    for b, (want_emb, want_pos, kept, first) in enumerate(naive):
        valid = mask[b].bool()
        assert torch.equal(pos[b][valid], want_pos)  # [CLS] id == first visual slot's id; others original
        assert pos[b][valid][first] == pos[b][valid][first + 1] or kept[0] != 0
        assert (emb[b][valid] - want_emb).abs().max() <= 1e-5
        assert (logits[b, -1] - _lm_logits(model, want_emb, want_pos)[-1]).abs().max() <= 1e-4
        sample = rec.samples[b]
        assert sample.events[0].keep_idx.tolist() == kept  # real candidate indices (63), [CLS] reported apart
        assert sample.events[0].inserted == [1] and sample.events[0].merged
        assert sample.retained_tokens == 64 and sample.layer_avg_tokens == 64
        assert sample.n_text == int(valid.sum()) - 64
    # decode: the first generated token continues at the unpruned prompt length (keep ids)
    lengths = inputs["attention_mask"].sum(1)
    assert calls[1][1][:, -1].tolist() == lengths.tolist()
    assert (steps[:, 0] - logits[:, -1]).abs().max() <= 1e-4


def test_llava_reference_preset_order_and_ids(models, batches):
    """Property 5 end to end: the LM sees [CLS, dominant (raster), contextual (target order)] with contiguous ids."""
    model, inputs = models["sdpa"], batches[2]
    naive = _naive_llava(model, inputs, 64, order="reference")
    with vtprune.pruned(model, "visionzip", 64, preset="reference", positions="reindex"), _lm_inputs(model) as calls:
        with torch.no_grad():
            logits = model(**inputs).logits
    emb, pos, mask = calls[0]
    for b, (want_emb, want_pos, _, _) in enumerate(naive):
        valid = mask[b].bool()
        assert torch.equal(pos[b][valid], want_pos)
        assert (emb[b][valid] - want_emb).abs().max() <= 1e-5
        assert (logits[b, -1] - _lm_logits(model, want_emb, want_pos)[-1]).abs().max() <= 1e-4
    check_oracles("llava", "visionzip", 0.1, {"preset": "reference", "positions": "reindex"}, selection_only=False)


def test_labels_of_inserted_tokens_are_ignored(models, batches):
    model, inputs = models["sdpa"], batches[2]
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == model.config.image_token_id, 3)  # visible labels on image rows
    seen = []
    with vtprune.pruned(model, "visionzip", 64):
        handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["labels"]), with_kwargs=True)
        try:
            with torch.no_grad():
                out = model(**inputs, labels=labels)
        finally:
            handle.remove()
        seq = vtprune.last_run(model).sequence_index
    pruned = seen[0]
    for b in range(2):
        image_slots = (seq[b] >= 0) & (
            inputs["input_ids"][b].gather(0, seq[b].clamp(min=0)) == model.config.image_token_id
        )
        slots = image_slots.nonzero().flatten()
        assert pruned[b, slots[0]] == -100 and (pruned[b, slots[1:]] == 3).all()  # [CLS] first, ignored
    want = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), pruned[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, want, atol=1e-5)


# ----------------------------------------------------------------------------------- engine: LLaVA-NeXT
def test_next_cls_per_tile_and_positions():
    """One [CLS] per vision view with a quota, = projector(that tile's feature-layer [CLS] output), right before
    the view's first candidate slot and with its position id."""
    fam = family("llava_next")
    model, inputs = fam.models["sdpa"], fam.batches[2]
    out, _, _ = _clip_reference(model, _next_pixels(model, inputs))
    with vtprune.pruned(model, "visionzip", 0.3), _lm_inputs(model) as calls, recorded_plans(model) as plans:
        with torch.no_grad():
            model(**inputs)
        rec = vtprune.last_run(model)
        ad = model._vtprune.adapter
        tiles = [ad.image_tiles(i) for i in range(2)]
        counts = ad.tile_counts()
    emb, pos, mask = calls[0]
    seq = rec.sequence_index
    starts = [0, counts[0]]
    for b in range(2):
        plan = plans[b][1]
        rows = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        cand = rows[ad.candidate_mask(b, len(rows))]
        views = tiles[b][plan.insert_at].tolist()
        assert views == sorted(set(tiles[b].tolist()))  # every view got a quota here
        assert rec.samples[b].events[0].inserted == [len(views)]
        assert len(plan.keep_idx) + len(views) == rec.samples[b].retained_tokens == round(0.3 * rec.samples[b].n_visual)
        for v, c in zip(views, plan.insert_at.tolist(), strict=True):
            slot = int((seq[b] == cand[c]).nonzero()[0])  # the first slot from that candidate's row
            with torch.no_grad():
                want = model.model.multi_modal_projector(out[starts[b] + v, 0])
            assert (emb[b, slot] - want).abs().max() <= 1e-5
            full_pos = (inputs["attention_mask"][b].cumsum(0) - 1)[cand[c]]
            assert pos[b, slot] == full_pos
            if c in plan.keep_idx.tolist():  # the candidate itself follows with the same id
                assert seq[b, slot + 1] == cand[c] and pos[b, slot + 1] == full_pos


def _next_pixels(model, inputs):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    tiles = [
        image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for s in inputs["image_sizes"].tolist()
    ]
    return torch.cat([p[:t] for p, t in zip(inputs["pixel_values"], tiles, strict=True)])


def test_next_reference_order():
    rec = check_oracles(
        "llava_next", "visionzip", 0.3, {"preset": "reference", "positions": "reindex"}, selection_only=False
    )
    assert all(s.retained_tokens == len(s.events[0].keep_idx) + sum(s.events[0].inserted) for s in rec.samples)


# ------------------------------------------------------------------------------------ shared oracles
VISIONZIP_CASES = [(fam, {}) for fam in FAMILIES] + [
    ("llava", {"merge": "mean", "positions": "reindex"}),
    ("qwen2_5_vl", {"preset": "reference", "positions": "reindex"}),
]


@pytest.mark.parametrize("fam,options", VISIONZIP_CASES)
def test_shared_oracles_visionzip(fam, options):
    rec = check_oracles(fam, "visionzip", 0.3, options, selection_only=False)
    for s in rec.samples:
        assert s.retained_tokens == len(s.events[0].keep_idx) + sum(s.events[0].inserted)
        assert (sum(s.events[0].inserted) > 0) == (fam != "qwen2_5_vl")


# ------------------------------------------------------------------------------ VisPruner: feature space
def test_vispruner_similarity_uses_pre_projector_features(models, batches):
    """A naive VisPruner on the hooked feature-layer patch outputs gives the engine's keep set (and one on the
    projector outputs does not)."""
    model, inputs = models["sdpa"], batches[2]
    out, eager_cls, _ = _clip_reference(model, inputs["pixel_values"])
    # the scores the engine hands the method (the adapter's q/k recompute) equal the eager map to rounding; the
    # keep set is compared on those exact scores, since near-ties in the random tiny model flip at 1e-10
    sdpa_out, cls = _adapter_signals(model, inputs["pixel_values"])
    assert torch.allclose(cls, eager_cls, atol=1e-6, rtol=0) and torch.allclose(sdpa_out, out, atol=1e-5, rtol=0)
    out = sdpa_out
    with vtprune.pruned(model, "vispruner", 64):
        with torch.no_grad():
            model(**inputs)
        kept = [s.events[0].keep_idx for s in vtprune.last_run(model).samples]
    with torch.no_grad():
        projected = model.model.multi_modal_projector(out[:, 1:])
    differs = False
    for b in range(2):
        assert torch.equal(vispruner_crop(out[b, 1:], cls[b], 64, 0.5), kept[b])
        differs |= not torch.equal(vispruner_crop(projected[b], cls[b], 64, 0.5), kept[b])
    assert differs
