"""The start of a prefill: the images of the batch (budgets, schedules, layouts) and the unpruned row group."""

from __future__ import annotations

import torch

from ..budget import Budget, image_budgets
from ..contract.method import PruningMethod
from ..errors import VtpruneError
from ..models.base import ModelAdapter
from .sequence import next_positions
from .state import ImageState, RowGroup


def find_images(
    *,
    input_ids: torch.Tensor,
    mask2d: torch.Tensor,
    is_img: torch.Tensor,
    positions: torch.Tensor | None,
    kwargs: dict,
    adapter: ModelAdapter,
    method: PruningMethod,
    budget: Budget,
    n_stages: int,
) -> tuple[list[ImageState], list[int], list[torch.Tensor]]:
    """Images in prompt order with their budgets and schedules.

    input_ids, mask2d, is_img (B, L); positions: the unpruned ids (None without images); kwargs: the call's (plus
    the enclosing `generate`'s layout kwargs). -> images, N per sample, each image's visual rows (n,) int64."""
    ad = adapter
    images: list[ImageState] = []
    rows_of: list[torch.Tensor] = []
    n_visual: list[int] = []
    split = [ad.split_images(is_img[b].nonzero().flatten()) for b in range(input_ids.shape[0])]
    if positions is not None:
        refined = ad.begin_prefill(input_ids, mask2d, positions, split, kwargs)
        split = split if refined is None else refined
    index = 0
    ids_host, mask_host = input_ids.cpu(), mask2d.bool().cpu()  # one copy each for every sample's seed
    for b, spans in enumerate(split):
        cands = [ad.candidate_mask(index + j, int(r.numel())) for j, r in enumerate(spans)]
        index += len(spans)
        per_image = [r if c is None else r[c.to(r.device)] for r, c in zip(spans, cands, strict=True)]
        sizes = [int(r.numel()) for r in per_image]
        n_visual.append(sum(sizes))
        if not sizes:
            continue
        budgets = image_budgets(budget.tokens_for(sum(sizes)), sizes, b)  # >= 1 token per image
        sample_seed = hash(tuple(ids_host[b][mask_host[b]].tolist()))
        offset = 0
        for j, (rows, n, k) in enumerate(zip(per_image, sizes, budgets, strict=True)):
            if k >= n or not n_stages:
                counts = [n] * n_stages
            else:
                counts = method.schedule(n, k, budget.mode, ad.num_layers)
                _check_schedule(method.name, counts, n, n_stages)
            grids, coords, crop = ad.image_layout(len(images), n)
            tiles = ad.image_tiles(len(images))
            images.append(
                ImageState(
                    sample=b,
                    offset=offset,
                    n=n,
                    counts=counts,
                    grids=grids,
                    coords=coords.to(rows.device),
                    crop=crop.to(rows.device),
                    seed=hash((sample_seed, j)) % (2**62),
                    span=spans[j],
                    cand=None if cands[j] is None else cands[j].to(rows.device),
                    tile=None if tiles is None else tiles.to(rows.device),
                )
            )
            rows_of.append(rows)
            offset += n
    return images, n_visual, rows_of


def first_group(
    *, mask2d: torch.Tensor, positions: torch.Tensor | None, images: list[ImageState], rows_of: list[torch.Tensor]
) -> RowGroup:
    """The unpruned rows (B, L): every image's visual rows with their image and candidate index, all input rows."""
    bsz, length = mask2d.shape
    device = mask2d.device
    next_pos = next_positions(positions, mask2d.bool())
    vis_image = torch.full((bsz, length), -1, dtype=torch.long, device=device)
    vis_index = torch.full_like(vis_image, -1)
    for i, img in enumerate(images):
        rows = rows_of[i]
        vis_image[img.sample, rows] = i
        vis_index[img.sample, rows] = torch.arange(img.n, device=device)
    seq_index = torch.arange(length, device=device).expand(bsz, -1).masked_fill(~mask2d.bool(), -1)
    return RowGroup(
        start=0,
        mask2d=mask2d,
        positions=positions,
        vis_image=vis_image,
        vis_index=vis_index,
        seq_index=seq_index,
        next_pos=next_pos,
    )


def _check_schedule(name: str, counts: list[int], n: int, n_stages: int) -> None:
    if (
        len(counts) != n_stages
        or any(c < 1 for c in counts)
        or any(b > a for a, b in zip([n, *counts], counts, strict=False))
    ):
        raise VtpruneError(f"method {name!r} produced an invalid schedule {counts} for {n} tokens")
