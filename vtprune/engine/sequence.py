"""Pure tensor helpers for compacting pruned sequences (no model knowledge)."""

from __future__ import annotations

import torch


def compact_rows(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded gather map of the kept rows of each sample.

    keep (B, L) bool, or int64 copies of each row (0, 1, 2, …: a row gathered c times, its copies adjacent)
    -> gather (B, L') int64 indices into L (0 on padding), valid (B, L') bool, with L' = max total count.
    Kept rows keep their order; old padding is dropped (it is not kept).
    """
    counts = keep.long()
    bsz, length = counts.shape
    total = counts.sum(1)
    width = int(total.max()) if bsz else 0
    gather = torch.zeros(bsz, width, dtype=torch.long, device=keep.device)
    valid = torch.zeros(bsz, width, dtype=torch.bool, device=keep.device)
    if width == 0:
        return gather, valid
    src = torch.repeat_interleave(torch.arange(bsz * length, device=keep.device), counts.flatten())
    b, l = src // length, src % length
    first = total.cumsum(0) - total  # index in `src` of each sample's first copy
    slot = torch.arange(src.numel(), device=keep.device) - first[b] + (width - total)[b]
    gather[b, slot] = l
    valid[b, slot] = True
    return gather, valid


def copy_rank(gather: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L') rank of each slot among the adjacent copies of its source row (0 for the first copy)."""
    width = gather.shape[1]
    pos = torch.arange(width, device=gather.device).expand_as(gather)
    starts = torch.ones_like(valid)
    starts[:, 1:] = (gather[:, 1:] != gather[:, :-1]) | ~valid[:, :-1]
    starts |= ~valid
    return pos - torch.where(starts, pos, 0).cummax(1).values


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


def rows_per_image(vis_image: torch.Tensor, n_images: int) -> list[torch.Tensor]:
    """The rows of each image in its sample, ascending, with two host reads for the whole batch.

    vis_image (B, L) int64: the image index of each row, −1 for text and padding -> per image i < n_images, (n_i,)
    int64 row indices (an image's rows all lie in one sample's row)."""
    at = (vis_image >= 0).nonzero()  # (R, 2) (sample, row), row-major: rows ascending within each sample
    ids = vis_image[at[:, 0], at[:, 1]]
    rows = at[torch.sort(ids, stable=True).indices, 1]
    return list(rows.split(torch.bincount(ids, minlength=n_images)[:n_images].tolist()))
