"""The `RunRecord` of a prefill (`vtprune.last_run`): counts per layer, kept / merged / inserted tokens per event,
every `select` call (timed); a bypassed prefill still gets N, n̄ = N, FLOPs and KV bytes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..budget import Budget
from ..contract.method import PruningMethod, Stage
from ..measurement.flops import LLMDims
from ..record import PruningEvent, RunRecord, SampleRecord, SelectCall
from .state import ForwardState, ImageState


@dataclass(frozen=True, kw_only=True)
class RecordContext:
    """What every record of a session names: the method, budget, position policy and model dimensions."""

    model: nn.Module
    method: PruningMethod
    budget: Budget
    positions: str
    stages: tuple[Stage, ...]
    num_layers: int
    dims: LLMDims

    def run(self, samples: list[SampleRecord], sequence_index: torch.Tensor | None) -> RunRecord:
        return RunRecord(
            method=self.method.name,
            budget=str(self.budget),
            positions=self.positions,
            samples=samples,
            dims=self.dims,
            bytes_per_elem=_bytes_per_elem(self.model),  # the model's dtype now
            sequence_index=sequence_index,
            method_info=_method_info(self.method),
        )


def pruned_record(fw: ForwardState, ctx: RecordContext) -> RunRecord:
    """Per-sample visual counts entering each layer (from the groups), kept indices per stage, `select` calls."""
    visual = {g.start: ((g.vis_image >= 0) & g.mask2d.bool()).sum(1) for g in fw.groups}  # (B,) per group
    per_layer = torch.stack(
        [visual[fw.group_for(layer).start] for layer in range(ctx.num_layers)], dim=1
    ).tolist()  # (B, L)
    text = (fw.groups[0].mask2d.bool() & (fw.groups[0].vis_image < 0)).sum(1).tolist()
    samples = []
    for b, n in enumerate(fw.n_visual):
        mine = [im for im in fw.images if im.sample == b]
        events = []
        for s, stage in enumerate(ctx.stages):
            parts = []
            for im in mine:
                prev = next((im.kept[t] for t in range(s, -1, -1) if t in im.kept), torch.arange(im.n))
                parts.append(prev + im.offset)
            idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            inserted = [sum(im.inserted.get(t, 0) for t in range(s + 1)) for im in mine]
            merged_idx = torch.cat([_merged_kept(im, s) for im in mine]) if mine else idx[:0]
            merged = any(s in im.merged for im in mine)
            events.append(
                PruningEvent(stage=str(stage), keep_idx=idx, merged=merged, inserted=inserted, merged_idx=merged_idx)
            )
        notes = [im.memo.get("record") for im in mine]
        samples.append(
            SampleRecord(
                n_visual=n,
                n_text=int(text[b]),
                visual_per_layer=per_layer[b],
                events=events,
                image_offsets=[im.offset for im in mine] + [n],
                method_info=notes,
            )
        )
    record = ctx.run(samples, fw.groups[-1].seq_index)
    record.selections = _selections(fw)
    return record


def passthrough_record(
    n_visual: list[int], images: list[ImageState], mask2d: torch.Tensor, ctx: RecordContext
) -> RunRecord:
    """Unpruned prefill: the record still carries N, n̄ = N, FLOPs and KV bytes."""
    valid = mask2d.sum(1).tolist()
    samples = []
    for b, n in enumerate(n_visual):
        offsets = [im.offset for im in images if im.sample == b] + [n]
        n_images = len(offsets) - 1
        events = [PruningEvent(stage=str(s), keep_idx=torch.arange(n), inserted=[0] * n_images) for s in ctx.stages]
        samples.append(
            SampleRecord(
                n_visual=n,
                n_text=int(valid[b]) - n,
                visual_per_layer=[n] * ctx.num_layers,
                events=events,
                image_offsets=offsets,
                method_info=[None] * n_images,
            )
        )
    return ctx.run(samples, None)


def _selections(fw: ForwardState) -> list[SelectCall]:
    """The prefill's `select` calls, each with its sample and image index in the sample."""
    out, per_sample = [], {}
    for im in fw.images:
        index = per_sample[im.sample] = per_sample.get(im.sample, -1) + 1
        for call in im.selections:
            call.sample, call.image = im.sample, index
            out.append(call)
    return out


def _merged_kept(im: ImageState, stage: int) -> torch.Tensor:
    """(M,) sorted sample-level indices of the image's tokens kept after `stage` whose rows are merges (a plan
    gave them new features at `stage` or before)."""
    merged = [im.merged_rows[t].cpu() for t in range(stage + 1) if t in im.merged_rows]
    if not merged:
        return torch.zeros(0, dtype=torch.long)
    kept = next((im.kept[t] for t in range(stage, -1, -1) if t in im.kept), torch.arange(im.n))
    return kept[torch.isin(kept, torch.cat(merged))] + im.offset


def _method_info(method: PruningMethod) -> dict | None:
    """The method's run-level record (`record_info()`, optional on a method), or None."""
    info = getattr(method, "record_info", None)
    return info() if callable(info) else None


def _bytes_per_elem(model: nn.Module) -> int:
    try:
        return next(model.parameters()).element_size()
    except StopIteration:  # pragma: no cover
        return 2
