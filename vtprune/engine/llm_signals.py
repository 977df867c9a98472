"""Signals an `llm:k` stage reads, over the rows of the current group (spec README §9; no eager attention).

Layer k−1 signals (`last_token_attention`, `mean_received_attention`, `key_norms`, the `suffix_*` family) come
from layer k−1's captured input and KV cache; in-layer signals (`layer_*`) from layer k's own input before the
stage removes rows. Question-span rows are found in the group by their input row (text rows are never pruned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import hf_compat as hf
from ..models.base import ModelAdapter
from . import signals as sig
from .state import ForwardState


@dataclass(frozen=True, kw_only=True)
class LayerInput:
    """One decoder layer's input as its pre-hook sees it."""

    layer: nn.Module
    hidden: torch.Tensor  # (B, L, D)
    pos_emb: tuple  # (cos, sin) of the rows
    mask2d: torch.Tensor  # (B, L) padding mask of the rows

    def astuple(self) -> tuple:
        return self.layer, self.hidden, self.pos_emb, self.mask2d


def llm_signals(
    fw: ForwardState, *, adapter: ModelAdapter, wanted: frozenset[str], layer_idx: int, here: LayerInput
) -> dict[str, torch.Tensor]:
    """Signals over the rows of the current group, each (B, L) fp32 (or per sample lists for the question-span
    ones), computed from layer k−1's captured input (`fw.captured[k − 1]`) or, for the in-layer signals, from
    layer k's own input `here`."""
    wanted = wanted & sig.LLM_SIGNALS
    if not wanted:
        return {}
    out: dict[str, torch.Tensor] = {}
    own = wanted & sig.OWN_LAYER_SIGNALS
    if own:
        with torch.no_grad():
            out.update(_own_layer_signals(fw, adapter, here, own))
        wanted = wanted - own
        if not wanted:
            return out
    prev, hidden, pos_emb, mask2d = fw.captured[layer_idx - 1].astuple()
    keys = hf.cache_keys(fw.cache, layer_idx - 1)
    if keys is not None and keys.shape[2] != hidden.shape[1]:
        keys = None
    with torch.no_grad():
        if "last_token_attention" in wanted:
            out["last_token_attention"] = sig.last_token_attention(adapter, prev, hidden, pos_emb, mask2d, keys)
        if "mean_received_attention" in wanted:
            out["mean_received_attention"] = sig.mean_received_attention(adapter, prev, hidden, pos_emb, mask2d, keys)
        suffix = wanted & {"suffix_attention", "suffix_attention_heads", "suffix_rope_gravity"}
        if suffix:
            out.update(_suffix_attention(fw, adapter, prev, hidden, pos_emb, mask2d, keys, suffix))
        if "key_norms" in wanted:
            if keys is None:
                _, keys, _ = adapter.query_key_states(prev, hidden, pos_emb, torch.zeros_like(mask2d[:, :1]))
            out["key_norms"] = sig.key_norms(keys)
    return out


def _own_layer_signals(fw: ForwardState, adapter: ModelAdapter, here: LayerInput, wanted: frozenset[str]) -> dict:
    """In-layer signals from layer k's own input: per sample `layer_last_token_attention` (L,),
    `layer_suffix_attention` (T_s, L), `layer_normed_features` (L, D) fp32 and `layer_normed_suffix` (T_s, D) fp32."""
    layer, hidden, pos_emb, mask2d = here.astuple()
    out: dict = {}
    if "layer_last_token_attention" in wanted:
        out["layer_last_token_attention"] = sig.last_token_attention(adapter, *here.astuple())
    if "layer_suffix_attention" in wanted:
        probs = _suffix_attention(fw, adapter, layer, hidden, pos_emb, mask2d, None)["suffix_attention"]
        out["layer_suffix_attention"] = probs
    if wanted & {"layer_normed_features", "layer_normed_suffix"}:
        normed = adapter.input_norm(layer, hidden).float()  # (B, L, D)
        if "layer_normed_features" in wanted:
            out["layer_normed_features"] = normed
        if "layer_normed_suffix" in wanted:
            out["layer_normed_suffix"] = [normed[b, r] for b, r in enumerate(_suffix_row_index(fw))]
    return out


def _suffix_row_index(fw: ForwardState) -> list[torch.Tensor]:
    """Per sample: the current group's row of each question-span input row (T_s,) int64."""
    group = fw.groups[-1]
    return [  # text rows are never pruned: each question-span input row is present in the group
        (group.seq_index[b][None, :] == wanted.to(group.seq_index.device)[:, None]).float().argmax(1)
        for b, wanted in enumerate(fw.suffix_rows)
    ]


def _suffix_attention(
    fw: ForwardState,
    adapter: ModelAdapter,
    layer,
    hidden,
    pos_emb,
    mask2d,
    keys,
    wanted=frozenset({"suffix_attention"}),
) -> dict[str, list[torch.Tensor]]:
    """Question-span signals of the current group's rows, per sample: `suffix_attention` (T_s, L) head-mean
    attention of the question-span rows over all rows, `suffix_attention_heads` (H, T_s, L) per query head
    (one computation serves both), `suffix_rope_gravity` (T_s, L) `signals.rope_gravity` of the rows' and
    all rows' position ids (the group's ids, i.e. those layer k−1's RoPE used)."""
    group = fw.groups[-1]
    rows = _suffix_row_index(fw)
    width = max(1, max(int(r.numel()) for r in rows))
    padded = torch.full((len(rows), width), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
    ok = torch.zeros(len(rows), width, dtype=torch.bool, device=hidden.device)
    for b, r in enumerate(rows):
        padded[b, : r.numel()] = r
        ok[b, : r.numel()] = True
    out: dict[str, list[torch.Tensor]] = {}
    if "suffix_attention_heads" in wanted:
        heads = sig.rows_attention(adapter, layer, hidden, pos_emb, mask2d, padded, ok, keys, heads=True)
        out["suffix_attention_heads"] = [heads[b, :, : r.numel()] for b, r in enumerate(rows)]  # (H, T_s, L)
        if "suffix_attention" in wanted:
            probs = heads.mean(1)  # (B, q, L), the same numbers as the head-mean path
            out["suffix_attention"] = [probs[b, : r.numel()] for b, r in enumerate(rows)]
    elif "suffix_attention" in wanted:
        probs = sig.rows_attention(adapter, layer, hidden, pos_emb, mask2d, padded, ok, keys)  # (B, q, L)
        out["suffix_attention"] = [probs[b, : r.numel()] for b, r in enumerate(rows)]
    if "suffix_rope_gravity" in wanted:
        spec = adapter.rotary_spec()
        pos = group.positions  # (B, L) or (R, B, L)
        out["suffix_rope_gravity"] = [
            sig.rope_gravity(pos[..., b, r], pos[..., b, :], spec.theta, spec.head_dim, spec.sections, spec.pair_rows)
            for b, r in enumerate(rows)
        ]
    return out
