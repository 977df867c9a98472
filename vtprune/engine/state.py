"""The state of one pruned prefill, kept for the decode steps on the same cache.

- `ImageState`: one image of the batch (its budget schedule, layout, signals, the method's memo and what each
  stage kept);
- `RowGroup`: the rows a run of decoder layers sees (padding mask, position ids, which image / candidate /
  input row each row is);
- `ForwardState`: one prefill (its images and groups, the cache, the question-span rows) — the object a cache
  maps to while it is decoded;
- `push_group`: gather a group's row metadata into the next group after a pruning event.

Shapes: B batch, L rows of a group, D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.base import ModelAdapter
from ..record import SelectCall
from .sequence import gather_positions, gather_rows, next_positions


@dataclass(kw_only=True)
class ImageState:
    """One image of the batch during a prefill."""

    sample: int
    offset: int  # first index of this image in the sample's visual-token list
    n: int
    counts: list[int]  # visual tokens kept after each stage (n everywhere when bypassed)
    grids: list[tuple[int, int]]
    coords: torch.Tensor  # (n, 2)
    crop: torch.Tensor  # (n,)
    seed: int
    span: torch.Tensor  # (S,) all placeholder rows of the image (visual + structural), ascending
    cand: torch.Tensor | None  # (S,) bool visual rows of the span, None when all are visual
    tile: torch.Tensor | None = None  # (n,) vision-encoder view of each candidate (LLaVA-NeXT tiles)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)  # vision and text signals of the image
    memo: dict = field(default_factory=dict)  # the method's per-image state across stages
    question: str | None = None
    embeddings: torch.Tensor | None = None  # (n, D) layer-0 input rows of the candidates (visual_embeddings)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> kept original indices (cpu)
    merged: set[int] = field(default_factory=set)  # stages whose kept rows carry merged features
    inserted: dict[int, int] = field(default_factory=dict)  # stage -> tokens the plan inserted (not candidates)
    merged_rows: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> original indices given merged rows
    selections: list[SelectCall] = field(default_factory=list)  # this image's `select` calls (timed)


@dataclass(kw_only=True)
class RowGroup:
    """Rows shared by a run of decoder layers [start, next group's start)."""

    start: int
    mask2d: torch.Tensor  # (B, L) int64 padding mask
    positions: torch.Tensor  # (B, L) or (R, B, L) position ids of the rows
    vis_image: torch.Tensor  # (B, L) int64 image id of each row, −1 for text/structure/padding
    vis_index: torch.Tensor  # (B, L) int64 original index inside its image (representative), −1 otherwise
    #   (−1 also on inserted tokens: visual rows, vis_image >= 0, that are no candidate)
    seq_index: torch.Tensor  # (B, L) int64 index into the input rows (inserted tokens: their slot's), −1 on padding
    next_pos: torch.Tensor  # (B,) position of the next generated token
    #: per layer kind (`ModelAdapter.layer_kind`, None for single-kind models): (cos, sin) and attention_mask of
    #: this group's rows (in-LLM groups only)
    pos_emb: dict = field(default_factory=dict)
    mask: dict = field(default_factory=dict)
    step_positions: torch.Tensor | None = None  # position ids of the current decode step
    in_llm: bool = False  # made by an in-LLM stage: its layers get `mask` / `pos_emb` instead of the model's


@dataclass(kw_only=True)
class ForwardState:
    """State of one forward call (prefill) that the decode steps on the same cache keep using."""

    prefill: bool
    images: list[ImageState]
    groups: list[RowGroup]
    cache: object
    n_visual: list[int]
    #: per sample: input rows of the question span (T_s,) int64 (empty list when no method signal needs them)
    suffix_rows: list[torch.Tensor] = field(default_factory=list)
    #: input row from which rows are generation rows (an uncached replay, `PruningSession.generated_rows_from`)
    generation_start: int | None = None
    #: layer -> its `llm_signals.LayerInput` (layer, hidden (B, L, D), (cos, sin), mask2d) where a signal reads it
    captured: dict[int, tuple] = field(default_factory=dict)
    injection: object = None  # the adapter's `take_injections` state at a prefill with in-LLM stages

    def group_for(self, layer_idx: int) -> RowGroup:
        for g in reversed(self.groups):
            if g.start <= layer_idx:
                return g
        return self.groups[0]


def push_group(
    fw: ForwardState,
    *,
    start: int,
    gather: torch.Tensor,
    valid: torch.Tensor,
    rule: str,
    reindex_all: bool,
    adapter: ModelAdapter,
    inserted: torch.Tensor | None = None,
) -> RowGroup:
    """Gather the current group's row metadata into a new group starting at layer `start`.

    gather (B, L') int64 rows of the current group, valid (B, L') bool; rule: the event's position rule ("keep" /
    "reindex"); reindex_all: the session's policy is "reindex" alone (every layer decodes from its own length);
    inserted (B, L') bool: slots holding inserted tokens (copies of their slot's row: same image, position id and
    input row; no candidate index)."""
    old = fw.groups[-1]
    positions = gather_positions(old.positions, gather)
    visual = gather_rows(old.vis_image, gather).masked_fill(~valid, -1)
    if rule == "reindex":
        ids = adapter.reindex_positions(positions, valid, visual >= 0)
        if reindex_all or start == 0:
            next_pos = next_positions(ids, valid)
        else:  # per-stage rules, in-LLM: decoding keeps layer 0's ids, so do generated rows of an uncached replay
            next_pos = old.next_pos
            if fw.generation_start is not None:
                generated = gather_rows(old.seq_index, gather) > fw.generation_start
                ids = torch.where(generated if ids.dim() == 2 else generated[None], positions, ids)
        positions = ids
    else:
        positions = positions * (valid if positions.dim() == 2 else valid[None])
        next_pos = old.next_pos
    new = RowGroup(
        start=start,
        mask2d=valid.long(),
        positions=positions,
        vis_image=visual,
        vis_index=gather_rows(old.vis_index, gather).masked_fill(~valid if inserted is None else ~valid | inserted, -1),
        seq_index=gather_rows(old.seq_index, gather).masked_fill(~valid, -1),
        next_pos=next_pos,
    )
    if start == 0:
        fw.groups[0] = new
    else:
        fw.groups.append(new)
    return new
