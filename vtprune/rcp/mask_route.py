"""RCP mask route (spec rcp.md §E "Training forward"): the frozen stock HF model on *all* tokens, with the
plug-ins driven by per-instance hooks.

- From the first pruning layer on, every decoder layer computes attention explicitly: post-softmax weights on
  visual key columns are multiplied by the current cumulative mask c and each row is renormalised (keeps the
  straight-through gradients). This is a custom attention function registered in transformers'
  `AttentionInterface` under `vtprune_rcp_<base>` (with `<base>`'s mask function); while a forward runs the
  model's *text config instance* names it, and forward pre-hooks hand each layer ≥ ℓ_1 its column
  multipliers as the per-call kwarg `rcp_keep` (B, T). Layers before ℓ_1 (and any call without the kwarg)
  run the model's own attention (sdpa/eager/...). Nothing global is patched; hooks and the config name are
  removed afterwards.
- At a pruning layer ℓ (its forward pre-hook, before the layer runs): q2v is read from layer ℓ's attention
  with the *previous* c (question-span rows recomputed from the layer input per head, visual columns × c,
  rows renormalised, head mean, row mean), the pruner runs on N-slot tensors (`RCPPlugins.prune_step`),
  and layer ℓ's own attention already uses the updated c.
- After each repair layer r (forward hook) the DRA modifies the generation positions (`gen` (B, T) bool).
- Position ids are the original ones (never changed); the 2-D padding mask is always passed.
- `teacher_states`: the same model, no plug-ins, no_grad: the repair layers' outputs at generation positions.
- `mask_route_forward`: the inference-mode route (eval masks, no noise, DRA on the last prompt token) that
  returns logits and the masks c per pruning layer: the physical route must reproduce it (spec property 8).

Families: those whose adapter sets `rcp_mask_route` (LLaVA-1.5 and LLaVA-NeXT; newline rows are structural:
never slots, their key columns keep weight 1). Others are refused (`UnsupportedModelError`; Qwen2.5-VL: its
M-RoPE inputs and processor are not covered here). One image per sample.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .. import hf_compat as hf
from .. import models
from ..errors import UnsupportedInputError, UnsupportedModelError
from ..models import adapter_for
from .modules import RCPPlugins, table_coords

ATTENTION_PREFIX = "vtprune_rcp_"


def supported_classes() -> tuple[str, ...]:
    """HF model classes whose adapter supports the mask route (`ModelAdapter.rcp_mask_route`)."""
    return tuple(name for a in models.ADAPTERS if a.rcp_mask_route for name in a.model_classes)


# --- explicit attention with column multipliers --------------------------------------------------------
LOGIT_CAP = 20.0


def keep_softmax(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax(scores) with every column multiplied by `keep` and rows renormalised, computed stably.

    scores (..., T) fp32 with invisible keys at the fp32 minimum; keep (..., T) broadcastable, 0/1 values
    (straight-through gradients allowed).  Equal in value to `p·keep / Σ p·keep` with p = softmax(scores),
    but the exponentials are taken relative to the largest *kept* logit, so a row whose kept keys get a
    vanishing share of p (e.g. attention concentrated on dropped tokens) neither underflows nor gives NaN
    gradients; exponents of dropped keys are capped at e^20 (only their gradient w.r.t. keep sees the cap).
    Rows without any kept key are all zero.  -> (..., T) fp32."""
    keep = keep.float()
    hard = (keep > 0.5).expand_as(scores)
    top = scores.masked_fill(~hard, float("-inf")).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, scores.amax(-1, keepdim=True)).detach()
    w = (scores - top).clamp(max=LOGIT_CAP).exp() * keep
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def _rcp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, base: str, **kwargs):
    """`AttentionInterface` function: with `rcp_keep` (B, T_kv) in kwargs, explicit attention whose post-softmax
    weights are multiplied by rcp_keep per key column and renormalised per row; without it, the `base`
    implementation.  query (B, H, q, d_h), key/value (B, H_kv, T_kv, d_h) -> ((B, q, H, d_h), weights)."""
    keep = kwargs.pop("rcp_keep", None)
    if keep is None:
        fn = hf.eager_attention() if base == "eager" else hf.attention_function(base)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if not (torch.is_grad_enabled() and keep.requires_grad):
        return _masked_sdpa(query, key, value, attention_mask, scaling, keep)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)).float() * scaling  # (B, H, q, T)
    q_len, kv_len = scores.shape[-2:]
    low = torch.finfo(torch.float32).min
    causal = torch.arange(kv_len, device=scores.device)[None] <= (
        torch.arange(q_len, device=scores.device)[:, None] + (kv_len - q_len)
    )
    if attention_mask is None:  # sdpa's is_causal shortcut
        scores = scores.masked_fill(~causal, low)
    elif attention_mask.dim() == 2:  # flash-style 2-D padding mask (1 = attend)
        visible = causal[None] & attention_mask[:, -kv_len:].bool()[:, None, :]
        scores = scores.masked_fill(~visible[:, None], low)
    elif attention_mask.dtype == torch.bool:  # sdpa: True = attend
        scores = scores.masked_fill(~attention_mask[..., -kv_len:], low)
    else:  # eager: additive
        scores = scores + attention_mask[..., -kv_len:].float()
    probs = keep_softmax(scores, keep[:, None, None, -kv_len:])
    out = probs.to(value.dtype) @ value
    return out.transpose(1, 2).contiguous(), probs


def _visible(attention_mask, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """The layer's mask as bool (B|1, 1, q, kv) True = attend, or None (causal) for the 2-D / None cases."""
    causal = torch.arange(kv_len, device=device)[None] <= (torch.arange(q_len, device=device)[:, None] + kv_len - q_len)
    if attention_mask is None:
        return causal[None, None]
    if attention_mask.dim() == 2:
        return causal[None, None] & attention_mask[:, -kv_len:].bool()[:, None, None, :]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., -kv_len:]
    return attention_mask[..., -kv_len:] > torch.finfo(attention_mask.dtype).min / 2


def _masked_sdpa(query, key, value, attention_mask, scaling, keep):
    """Forward-only path (no gradient w.r.t. keep needed): keys with keep 0 masked out, fused SDPA; the same
    values as the explicit path (attention over the kept keys).  Masked entries get the dtype minimum (not
    −inf), so rows without any visible key (padding) stay finite."""
    q_len, kv_len = query.shape[2], key.shape[2]
    visible = _visible(attention_mask, q_len, kv_len, query.device) & (keep[:, None, None, -kv_len:] > 0.5)
    bias = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
    bias = bias.masked_fill(~visible, torch.finfo(query.dtype).min)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register(base: str) -> str:
    name = ATTENTION_PREFIX + base
    hf.register_attention(name, partial(_rcp_attention, base=base), mask_like=base)
    return name


@contextmanager
def explicit_attention(model: nn.Module):
    """While active, the model's text config names the RCP attention function (per instance)."""
    adapter = adapter_for(model)
    cfg = adapter.text_config
    base = cfg._attn_implementation or "eager"
    if base.startswith(ATTENTION_PREFIX):
        yield adapter
        return
    if base not in ("sdpa", "eager") and not base.startswith("flash"):
        raise UnsupportedModelError(f"RCP's mask route needs sdpa, eager or flash attention, not {base!r}")
    cfg._attn_implementation = _register(base)
    try:
        yield adapter
    finally:
        cfg._attn_implementation = base


# --- inputs ---------------------------------------------------------------------------------------------
@dataclass
class RouteBatch:
    """Everything one mask-route forward needs (B samples, T positions, N slots, L_q question rows)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T) original positions
    features: list  # per-image (n_i, d) projector outputs (frozen, no grad)
    visual_rows: torch.Tensor  # (B, N) sequence index of each slot (0 at padded slots)
    slot_valid: torch.Tensor  # (B, N) bool
    pos: torch.Tensor  # (B, N, 2) continuous indices into the 24×24 positional table
    q_rows: torch.Tensor  # (B, L_q) question-span positions (padded with the last one)
    q_valid: torch.Tensor  # (B, L_q) bool
    gen: torch.Tensor  # (B, T) bool generation positions (DRA gate, loss rows)
    extra: dict = field(default_factory=dict)


def _check_model(model) -> None:
    name = type(model).__name__
    try:
        supported = adapter_for(model).rcp_mask_route
    except UnsupportedModelError:
        supported = False
    if not supported:
        raise UnsupportedModelError(
            f"RCP's mask route (training) supports {', '.join(supported_classes())}, not {name} "
            "(Qwen2.5-VL: M-RoPE inputs are not covered by the training route yet)"
        )
    if getattr(model, "_vtprune", None) is not None:
        raise UnsupportedInputError("remove the vtprune session (vtprune.remove(model)) before RCP's mask route")


def prepare_batch(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_kwargs: dict,
    prompt_end: torch.Tensor | None = None,
    gen: torch.Tensor | None = None,
    features: list | None = None,
) -> RouteBatch:
    """Encode the images (no grad) and locate slots, question span and generation positions.

    image_kwargs: pixel_values (+ image_sizes for LLaVA-NeXT); prompt_end (B,) index of the last prompt token
    (default: the last valid position); gen (B, T) bool (default: the last prompt token only)."""
    _check_model(model)
    adapter = adapter_for(model)
    device = input_ids.device
    mask2d = attention_mask.long()
    B, T = input_ids.shape
    if prompt_end is None:
        prompt_end = (torch.arange(T, device=device)[None] * mask2d).argmax(-1)
    if features is None:
        with torch.no_grad():
            features = adapter.encode_images(dict(image_kwargs))
    image_ids = torch.tensor(adapter.visual_token_ids, device=device)
    is_image = torch.isin(input_ids, image_ids) & mask2d.bool()
    per_sample = [adapter.split_images(is_image[b].nonzero().flatten()) for b in range(B)]
    if any(len(r) != 1 for r in per_sample):
        raise UnsupportedInputError(f"RCP needs exactly one image per sample, got {[len(r) for r in per_sample]}")
    positions = adapter.original_positions(input_ids, mask2d, {})
    adapter.begin_prefill(input_ids, mask2d, positions, per_sample, dict(image_kwargs))
    rows, coords = [], []
    for b in range(B):
        span = per_sample[b][0]
        cand = adapter.candidate_mask(b, int(span.numel()))
        r = span if cand is None else span[cand.to(device)]
        grids, xy, crop = adapter.image_layout(b, int(r.numel()))
        rows.append(r)
        coords.append(table_coords(xy.to(device), crop.to(device), grids))
    N = max(int(r.numel()) for r in rows)
    visual_rows = torch.zeros(B, N, dtype=torch.long, device=device)
    slot_valid = torch.zeros(B, N, dtype=torch.bool, device=device)
    pos = torch.zeros(B, N, 2, device=device)
    for b, (r, xy) in enumerate(zip(rows, coords, strict=True)):
        visual_rows[b, : r.numel()] = r
        slot_valid[b, : r.numel()] = True
        pos[b, : r.numel()] = xy
    q_start = torch.stack([per_sample[b][0][-1] + 1 for b in range(B)])
    lengths = (prompt_end - q_start + 1).clamp_min(1)
    Lq = int(lengths.max())
    offs = torch.arange(Lq, device=device)[None]
    q_valid = offs < lengths[:, None]
    q_rows = torch.minimum(q_start[:, None] + offs, prompt_end[:, None])
    if gen is None:
        gen = torch.zeros(B, T, dtype=torch.bool, device=device)
        gen[torch.arange(B, device=device), prompt_end] = True
    return RouteBatch(
        input_ids, mask2d, positions, list(features), visual_rows, slot_valid, pos, q_rows, q_valid, gen.bool()
    )


# --- the forward ----------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised after the last pruning layer when only the masks are wanted."""


@dataclass
class RouteState:
    """Per-forward state of the plug-ins (all per sample)."""

    c: torch.Tensor  # (B, N) cumulative mask
    vdrop: torch.Tensor | None  # (B, N, d) rows stored at drop time
    col_keep: torch.Tensor  # (B, T) key-column multipliers (1 except visual slots: c)
    ctx: dict = field(default_factory=dict)  # pruning layer -> (e_mask, e_pruned)
    masks: dict = field(default_factory=dict)  # pruning layer -> c after it (B, N)
    logits: dict = field(default_factory=dict)  # pruning layer -> z (B, N) fp32
    q2v: dict = field(default_factory=dict)  # pruning layer -> (B, N)
    ratios: dict = field(default_factory=dict)  # pruning layer -> per-sample kept fraction (B,)
    repair: dict = field(default_factory=dict)  # repair layer -> (M, d) rows after the DRA


def question_to_visual(adapter, layer, hidden, pos_emb, rb: RouteBatch, col_keep: torch.Tensor) -> torch.Tensor:
    """q2v (B, N): layer's attention of the question-span rows (queries/keys from the layer input, RoPE at the
    original positions, fp32 softmax) with key columns × col_keep and rows renormalised (`keep_softmax`, i.e.
    the attention over the still-kept keys), per head; visual columns, head mean, mean over the valid rows
    (0 at padded slots).  The physical route's `engine.signals.rows_attention` over the kept rows is the same."""
    q, k, scaling = adapter.query_key_states(layer, hidden, pos_emb, rb.q_rows)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling  # (B, H, L_q, T)
    T = hidden.shape[1]
    visible = rb.attention_mask.bool()[:, None, :] & (torch.arange(T, device=hidden.device) <= rb.q_rows[..., None])
    scores = scores.masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
    probs = keep_softmax(scores, col_keep[:, None, None, :])
    B, H, Lq, _ = probs.shape
    idx = rb.visual_rows[:, None, None, :].expand(B, H, Lq, -1)
    vis = probs.gather(-1, idx).mean(1)  # (B, L_q, N)
    w = rb.q_valid.float()[..., None]
    q2v = (vis * w).sum(1) / w.sum(1).clamp_min(1.0)
    return q2v * rb.slot_valid.float()


def _col_keep(c: torch.Tensor, rb: RouteBatch) -> torch.Tensor:
    keep = torch.ones(rb.input_ids.shape, dtype=torch.float32, device=c.device)
    b_idx, s_idx = rb.slot_valid.nonzero(as_tuple=True)
    return keep.index_put((b_idx, rb.visual_rows[b_idx, s_idx]), c[b_idx, s_idx].float())


@contextmanager
def _hooks(model, plugins: RCPPlugins, rb: RouteBatch, state: RouteState, step_kwargs: dict, stop: bool):
    adapter = adapter_for(model)
    placement = plugins.placement
    layers = adapter.layers
    if len(layers) != placement.num_layers:
        raise UnsupportedModelError(f"plug-ins placed for {placement.num_layers} layers, the model has {len(layers)}")
    first, last = placement.pruning_layers[0], placement.pruning_layers[-1]
    pruning = set(placement.pruning_layers)
    source = placement.source_map
    noise = step_kwargs.pop("noise", None) or {}
    query_keep = step_kwargs.pop("query_keep", None) or {}
    forced = step_kwargs.pop("forced", None) or {}

    def pre(idx, module, args, kwargs):
        if idx in pruning:
            hidden = args[0] if args else kwargs["hidden_states"]
            pe = kwargs["position_embeddings"]
            hn = module.input_layernorm(hidden)
            d = hn.shape[-1]
            V = hn.gather(1, rb.visual_rows[..., None].expand(-1, -1, d)) * rb.slot_valid[..., None].to(hn.dtype)
            Hq = hn.gather(1, rb.q_rows[..., None].expand(-1, -1, d))
            q2v = question_to_visual(adapter, module, hidden, pe, rb, state.col_keep)
            if state.vdrop is None:
                state.vdrop = torch.zeros_like(V)
            out = plugins.prune_step(
                idx,
                q2v,
                V,
                Hq,
                rb.q_valid,
                state.c,
                state.vdrop,
                rb.pos,
                rb.slot_valid,
                u=noise.get(idx),
                query_keep=query_keep.get(idx),
                forced=forced.get(idx),
                **step_kwargs,
            )
            state.c, state.vdrop = out.c, out.vdrop
            state.ctx[idx] = (out.e_mask, out.e_pruned)
            state.masks[idx], state.logits[idx], state.q2v[idx] = out.c, out.z, q2v
            valid = rb.slot_valid.float()
            state.ratios[idx] = (out.c * valid).sum(-1) / valid.sum(-1)
            state.col_keep = _col_keep(out.c, rb)
            if stop and idx == last:
                raise _Stop
        kwargs = dict(kwargs)
        kwargs["rcp_keep"] = state.col_keep
        return args, kwargs

    def post(idx, module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        y = plugins.repair(idx, x, state.ctx[source[idx]], rb.gen)
        state.repair[idx] = y[rb.gen]
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handles = []
    try:
        for i in range(first, len(layers)):
            handles.append(layers[i].register_forward_pre_hook(partial(pre, i), with_kwargs=True))
        for r in placement.repair_layers:
            handles.append(layers[r].register_forward_hook(partial(post, r)))
        yield
    finally:
        for h in handles:
            h.remove()


def _backbone(model, rb: RouteBatch):
    adapter = adapter_for(model)
    return adapter.base_model(
        input_ids=rb.input_ids,
        attention_mask=rb.attention_mask,
        position_ids=rb.position_ids,
        mm_encoder_outputs=adapter.features_to_kwargs(rb.features),
        use_cache=False,
    ).last_hidden_state


def student_forward(
    model,
    plugins: RCPPlugins,
    rb: RouteBatch,
    *,
    train: bool,
    tau: float = 1.0,
    noise_on: bool = True,
    noise: dict | None = None,
    query_keep: dict | None = None,
    delta: float = 0.0,
    tau_eval: float = 0.2,
    theta: float = 0.5,
    stop_after_pruning: bool = False,
    forced_masks: dict | None = None,
) -> tuple[torch.Tensor | None, RouteState]:
    """The mask-route forward with plug-ins.  train: Gumbel STE masks (tau, noise_on, per-layer uniforms
    `noise` {ℓ: (B, N)} and query-row keep masks `query_keep` {ℓ: (B, n_q)}); else inference masks (delta,
    tau_eval, theta).  forced_masks {ℓ: (B, N) 0/1}: replay these keep decisions (the pruners still run).
    -> (final hidden states (B, T, d) after the model's last norm, or None when
    `stop_after_pruning`; the RouteState with masks, logits, context and repaired rows)."""
    B, N = rb.slot_valid.shape
    c = rb.slot_valid.float()
    state = RouteState(c=c, vdrop=None, col_keep=_col_keep(c, rb))
    step_kwargs = dict(
        train=train,
        tau=tau,
        noise_on=noise_on,
        delta=delta,
        tau_eval=tau_eval,
        theta=theta,
        noise=noise,
        query_keep=query_keep,
        forced=forced_masks,
    )
    with explicit_attention(model), _hooks(model, plugins, rb, state, step_kwargs, stop_after_pruning):
        try:
            hidden = _backbone(model, rb)
        except _Stop:
            hidden = None
    return hidden, state


@torch.no_grad()
def teacher_states(model, rb: RouteBatch, repair_layers) -> dict[int, torch.Tensor]:
    """The frozen model, all tokens, no plug-ins: repair-layer outputs at generation positions {r: (M, d)}."""
    _check_model(model)
    layers = adapter_for(model).layers
    out: dict[int, torch.Tensor] = {}

    def grab(idx, module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        out[idx] = x[rb.gen].detach()

    handles = [layers[r].register_forward_hook(partial(grab, r)) for r in repair_layers]
    try:
        _backbone(model, rb)
    finally:
        for h in handles:
            h.remove()
    return out


@dataclass
class MaskRouteOutput:
    """Result of `mask_route_forward`."""

    logits: torch.Tensor  # (B, T, V) fp32
    masks: dict  # pruning layer -> c after it (B, N) (0/1 float)
    z: dict  # pruning layer -> keep logits (B, N) fp32
    q2v: dict  # pruning layer -> (B, N)
    batch: RouteBatch  # slots (visual_rows, slot_valid, pos), question rows, gen
    state: RouteState


def mask_route_forward(
    model,
    plugins: RCPPlugins,
    inputs: dict,
    *,
    delta: float = 0.0,
    tau_eval: float = 0.2,
    theta: float = 0.5,
    gen: torch.Tensor | None = None,
    prompt_end: torch.Tensor | None = None,
    forced_masks: dict | None = None,
) -> MaskRouteOutput:
    """Inference-mode mask route: eval masks (no noise, no dropout), DRA at `gen` (default: the last prompt
    token).  inputs: input_ids, attention_mask, pixel_values (+ image_sizes); for prompt + generated tokens pass
    `prompt_end` (B,) (the question span ends there) and `gen` (B, T) (last prompt token and generated ones),
    which is the no-cache reference of cached decoding.  forced_masks {ℓ: (B, N)}: replay keep decisions
    (e.g. the ones a physical run took).  Plug-ins are put in eval mode for the call; gradients
    follow the caller's grad mode."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image_kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    rb = prepare_batch(model, ids, mask, image_kwargs, prompt_end=prompt_end, gen=gen)
    was = plugins.training
    plugins.eval()
    try:
        hidden, state = student_forward(
            model, plugins, rb, train=False, delta=delta, tau_eval=tau_eval, theta=theta, forced_masks=forced_masks
        )
    finally:
        plugins.train(was)
    logits = model.get_output_embeddings()(hidden).float()
    return MaskRouteOutput(logits, state.masks, state.logits, state.q2v, rb, state)
