"""Decode steps on a cache a prefill pruned: padding masks and position ids of the new rows.

Every group's 2-D mask grows by the new tokens and each group decodes from its own next position; the model gets
layer 0's group (`begin_step`), and each in-LLM stage layer rebuilds its group's mask (and RoPE where the group's
ids differ from layer 0's) for the new rows (`step_group`).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedInputError
from ..models.base import ModelAdapter
from .plan import HookPlan
from .sequence import step_positions
from .state import ForwardState


def is_visual(input_ids: torch.Tensor, adapter: ModelAdapter) -> torch.Tensor:
    """(B, L) bool: rows holding one of the adapter's visual placeholder ids."""
    ids = torch.tensor(adapter.visual_token_ids, dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, ids)


def begin_step(fw: ForwardState, kwargs: dict, *, adapter: ModelAdapter) -> dict:
    """One decode step of q new tokens: extend every group (mask, step ids, next id); -> the model's kwargs with
    layer 0's group's mask (B, L0 + t) and position ids (B, q) or (R, B, q)."""
    ids = kwargs.get("input_ids")
    if ids is None:
        raise UnsupportedInputError("vtprune needs input_ids when continuing a pruned cache")
    if is_visual(ids, adapter).any():
        raise UnsupportedInputError("a new image in a later turn of a pruned conversation is not supported")
    q = ids.shape[1]
    given = kwargs.get("attention_mask")
    cols = given[:, -q:].long() if given is not None else torch.ones_like(ids)
    rows = adapter.position_rows
    for g in fw.groups:
        g.mask2d = torch.cat([g.mask2d, cols], dim=1)
        g.step_positions = step_positions(g.next_pos, q, rows)
        g.next_pos = g.next_pos + q
    first = fw.groups[0]
    kwargs["attention_mask"] = first.mask2d
    kwargs["position_ids"] = first.step_positions
    adapter.check_decode(first.step_positions)
    return kwargs


def step_group(
    fw: ForwardState, *, idx: int, hidden: torch.Tensor, kwargs: dict, adapter: ModelAdapter, plan: HookPlan
) -> None:
    """Decode step at a stage layer: rebuild the group's mask (and rope for `reindex`)."""
    group = next((g for g in fw.groups if g.start == idx), None)
    if group is None:  # nobody pruned at this stage in this prefill: the layer runs on the previous group
        return
    here = plan.kind_of[idx]
    for kind in plan.kinds:
        if not plan.reindex_all and kind == here:  # every group decodes at layer 0's ids
            group.pos_emb[kind] = kwargs["position_embeddings"]
        else:
            group.pos_emb[kind] = adapter.rotary(hidden, group.step_positions, kind)
        group.mask[kind] = adapter.layer_mask(hidden, group.mask2d, fw.cache, plan.first_of_kind(idx, kind))
