"""The per-image selection step, shared by the `vision`/`pre_llm` path and the `llm:k` path.

`select_images` builds the method's `ImageTokens` view of each image a stage prunes, calls
`method.select_batch` once for them (timed; each image gets a `SelectCall` with its share of the time), checks each
returned `KeepPlan` against the contract (`check_plan`), notes which kept tokens carry merged features and records
the kept original indices on the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..contract.method import ImageTokens, KeepPlan, PruningMethod
from ..errors import VtpruneError
from ..record import SelectCall
from .state import ImageState


@dataclass(frozen=True, kw_only=True)
class Selector:
    """A session's method with the rules its plans must follow."""

    method: PruningMethod
    before_llm: tuple[bool, ...]  # per stage: it acts before the LLM (inserted tokens are allowed there)
    reindex_all: bool  # the position policy is "reindex" alone (a plan's output `order` needs it)


@dataclass(frozen=True, kw_only=True)
class SelectRequest:
    """One image to prune at a stage.

    features (n, D): the image's current candidates (projector outputs before the LLM, hidden states at `llm:k`);
    original_index (n,) int64: each candidate's index among the image's original tokens (None: all n, in order);
    signals: the view's signals, already per candidate."""

    image: ImageState
    features: torch.Tensor
    k: int
    signals: dict[str, torch.Tensor]
    original_index: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None


def _view(req: SelectRequest) -> ImageTokens:
    image, whole = req.image, req.original_index is None
    orig = torch.arange(image.n, device=image.coords.device) if whole else req.original_index
    return ImageTokens(
        features=req.features,
        coords=image.coords if whole else image.coords[orig],
        crop=image.crop if whole else image.crop[orig],
        grids=image.grids,
        original_index=orig,
        signals=req.signals,
        seed=image.seed,
        memo=image.memo,
        question=image.question,
        tile=None if image.tile is None else image.tile if whole else image.tile[orig],
        project=req.project,
    )


def select_images(selector: Selector, *, stage: int, requests: list[SelectRequest]) -> list[KeepPlan]:
    """Ask the method for the plans of all images pruned at `stage` (one timed `select_batch` call) and record
    each on its image. -> the checked plans, in order (tensors on each image's features' device);
    `image.kept[stage]` holds the kept original indices, `image.merged_rows[stage]` those given merged rows."""
    if not requests:
        return []
    views = [_view(r) for r in requests]
    call = SelectCall.start(stage, requests[0].features.device)
    plans = selector.method.select_batch(stage, views, [r.k for r in requests])
    call.stop()
    if not isinstance(plans, list) or len(plans) != len(requests):
        got = len(plans) if isinstance(plans, list) else type(plans).__name__
        raise VtpruneError(f"{selector.method.name}: select_batch returned {got} plans for {len(requests)} images")
    calls = call.split(len(requests)) if len(requests) > 1 else [call]
    name = selector.method.name
    # the data checks of every plan in one host read (a read per plan stalls an accelerator's queue per image)
    device = requests[0].features.device
    flags = [check_plan_shape(selector, view=v, k=r.k, plan=p).to(device)
             for r, v, p in zip(requests, views, plans, strict=True)]  # fmt: skip
    bad = torch.stack(flags)
    if bool(bad.any()):
        view = views[int(bad.int().argmax())]
        raise VtpruneError(f"{name}: keep_idx must be sorted, unique and within [0, {view.n})")
    plans = [check_plan(selector, stage=stage, view=v, plan=p) for v, p in zip(views, plans, strict=True)]
    for req, view, plan, c in zip(requests, views, plans, calls, strict=True):
        _record(selector, stage, req, view, plan, c)
    # the kept original indices of every image in one copy to the host (rows may be in a reference order)
    kept = [view.original_index[plan.keep_idx].detach() for view, plan in zip(views, plans, strict=True)]
    on_host = torch.cat([k.to(kept[0].device, torch.long) for k in kept]).to("cpu")
    for req, part in zip(requests, on_host.split([k.numel() for k in kept]), strict=True):
        req.image.kept[stage] = part.sort().values
    return plans


def _record(selector: Selector, stage: int, req: SelectRequest, view: ImageTokens, plan: KeepPlan,
            call: SelectCall) -> None:
    image = req.image
    image.selections.append(call)
    if plan.new_feats is not None:  # which kept tokens carry merged features (the record's `merged_idx`)
        differs = (plan.new_feats != view.features[plan.keep_idx].to(plan.new_feats.dtype)).any(-1)
        image.merged_rows[stage] = view.original_index[plan.keep_idx][differs]
    if plan.n_inserted:
        image.inserted[stage] = plan.n_inserted
    if selector.method.merges:
        image.merged.add(stage)


def check_plan_shape(selector: Selector, *, view: ImageTokens, k: int, plan: KeepPlan) -> torch.Tensor:
    """Refuse a plan whose keep_idx / new_feats have the wrong type or count (no host read); -> a 0-d bool tensor,
    True when keep_idx is not sorted, unique and within [0, n) (read by the caller, once for all plans)."""
    name = selector.method.name
    idx = plan.keep_idx
    if not torch.is_tensor(idx) or idx.dim() != 1 or idx.dtype != torch.long:
        raise VtpruneError(f"{name}: keep_idx must be a 1-D int64 tensor")
    extra = plan.n_inserted
    if selector.method.exact_count and idx.numel() + extra != k:
        more = f" + {extra} inserted" if extra else ""
        raise VtpruneError(f"{name}: returned {idx.numel()}{more} tokens, scheduled {k}")
    if plan.new_feats is not None and plan.new_feats.shape[0] != idx.numel():
        raise VtpruneError(f"{name}: new_feats has {plan.new_feats.shape[0]} rows for {idx.numel()}")
    if not idx.numel():
        return torch.zeros((), dtype=torch.bool, device=idx.device)
    return (idx[0] < 0) | (idx[-1] >= view.n) | (idx[1:] <= idx[:-1]).any()


def check_plan(selector: Selector, *, stage: int, view: ImageTokens, plan: KeepPlan) -> KeepPlan:
    """After `check_plan_shape`: moves the plan's index tensors to the features' device and refuses inserted
    tokens or an output order that break the contract (`KeepPlan`)."""
    name = selector.method.name
    idx, n, extra = plan.keep_idx, view.n, plan.n_inserted
    device = view.features.device
    plan.keep_idx = idx.to(device)
    if plan.inserted is not None:
        at = plan.insert_at
        if not selector.method.inserts or not selector.before_llm[stage]:
            raise VtpruneError(f"{name}: inserted tokens need a method with inserts = True at a vision/pre_llm stage")
        if (
            at is None
            or at.dim() != 1
            or at.dtype != torch.long
            or at.numel() != extra
            or plan.inserted.dim() != 2
            or plan.inserted.shape[1] != view.features.shape[1]
            or (extra and (at[0] < 0 or at[-1] >= n or (at[1:] < at[:-1]).any()))
        ):
            raise VtpruneError(
                f"{name}: inserted must be (E, {view.features.shape[1]}) with insert_at (E,) int64 non-decreasing "
                f"candidate indices in [0, {n})"
            )
        plan.insert_at = at.to(device)
    if plan.order is not None:
        total = idx.numel() + extra
        order = plan.order
        if not selector.reindex_all:
            raise VtpruneError(f"{name}: an output `order` needs positions='reindex' (a reference order's ids)")
        if (
            order.dtype != torch.long
            or order.shape != (total,)
            or not torch.equal(order.sort().values.cpu(), torch.arange(total))
        ):
            raise VtpruneError(f"{name}: order must be a permutation of the {total} output tokens")
        plan.order = order.to(device)
    return plan
