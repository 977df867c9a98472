"""Pure tensor helpers for compacting pruned sequences (no model knowledge)."""

from __future__ import annotations

import torch


def compact_rows(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded gather map of the kept rows of each sample.

    keep (B, L) bool -> gather (B, L') int64 indices into L (0 on padding), valid (B, L') bool,
    with L' = max kept count. Kept rows keep their order; old padding is dropped (it is not kept).
    """
    bsz, _ = keep.shape
    counts = keep.sum(1)
    width = int(counts.max()) if bsz else 0
    dest = keep.long().cumsum(1) - 1 + (width - counts)[:, None]  # (B, L) slot of each kept row
    gather = torch.zeros(bsz, width, dtype=torch.long, device=keep.device)
    valid = torch.zeros(bsz, width, dtype=torch.bool, device=keep.device)
    b, l = keep.nonzero(as_tuple=True)
    gather[b, dest[b, l]] = l
    valid[b, dest[b, l]] = True
    return gather, valid


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) , index (B, L') -> (B, L', ...)."""
    shape = index.shape + x.shape[2:]
    idx = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(shape)
    return x.gather(1, idx)


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) or (R, B, L) gathered along the sequence: -> (B, L') or (R, B, L')."""
    if positions.dim() == 2:
        return positions.expand(index.shape[0], -1).gather(1, index)
    rows = positions.shape[0]
    return positions.expand(rows, index.shape[0], -1).gather(2, index.expand(rows, -1, -1))


def next_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Position of the first generated token per sample: max id over valid rows + 1.  -> (B,)"""
    pos = positions if positions.dim() == 2 else positions.amax(0)
    return (pos.masked_fill(~valid, -1).amax(1) + 1).clamp(min=0)


def step_positions(start: torch.Tensor, q: int, rows: int | None) -> torch.Tensor:
    """Ids of q new tokens from per-sample `start` (B,): (B, q), or (rows, B, q) for M-RoPE."""
    pos = start[:, None] + torch.arange(q, device=start.device)[None]
    return pos if rows is None else pos[None].expand(rows, -1, -1).contiguous()
