"""The `vision`/`pre_llm` stage: select per image before the LLM, shorten the ids, hand pruned features over.

Tokens a plan inserts (e.g. VisionZip's [CLS]) take a copy of their slot's row: the image-token id and the
slot's position id; the features handed to the model put the inserted row first. A plan's output `order`
permutes the image's slots (reference orders; ids are reindexed afterwards).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedInputError
from ..models.base import ModelAdapter
from . import signals as sig
from .plan import HookPlan
from .select import Selector, SelectRequest, select_images
from .sequence import compact_rows, copy_rank, rows_per_image
from .state import ForwardState, push_group
from .vision import VisionCapture


def prune_before_llm(
    fw: ForwardState,
    kwargs: dict,
    *,
    adapter: ModelAdapter,
    plan: HookPlan,
    selector: Selector,
    vision: VisionCapture,
) -> None:
    """Stage 0 of every image; rewrites the model's kwargs in place (input_ids, mm_encoder_outputs, labels, token
    type ids) and replaces `fw.groups[0]` by the rows that enter the LLM."""
    ad, group = adapter, fw.groups[0]
    feats = ad.features_from_kwargs(kwargs)
    if feats is None:
        if all(kwargs.get(name) is None for name in ad.pixel_kwargs):
            raise UnsupportedInputError(
                f"missing image: the prompt has image tokens but neither {' / '.join(ad.pixel_kwargs)} "
                "nor mm_encoder_outputs"
            )
        vision.clear()
        feats = ad.encode_images(kwargs)
    spans = [int(im.span.numel()) for im in fw.images]
    if len(feats) != len(fw.images) or any(int(f.shape[0]) != n for f, n in zip(feats, spans, strict=False)):
        raise UnsupportedInputError(
            f"the images give {[int(f.shape[0]) for f in feats]} visual tokens but the prompt has "
            f"{spans} image placeholders"
        )
    wanted = selector.method.signals(0) & sig.VISION_SIGNALS
    if wanted:
        vision.attach(fw.images, wanted)

    keep = group.mask2d.bool() & (group.vis_image < 0)
    extra = torch.zeros_like(group.vis_image)  # (B, L) inserted tokens placed at each row
    project = vision.project if "vision_features" in ad.vision_signal_names else None
    new_feats: list[torch.Tensor] = []
    sources: list[torch.Tensor | None] = []  # per image: candidate behind each output token, −1 inserted
    orders: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # image -> (default, plan) token orders
    rows_of = rows_per_image(group.vis_image, len(fw.images))
    pruned = [i for i, img in enumerate(fw.images) if img.counts[0] < img.n]
    requests = []
    for i in pruned:
        img = fw.images[i]
        if img.cand is not None:  # structural rows (e.g. newlines) go with the pruned image
            keep[img.sample, img.span[~img.cand]] = False
        visual = feats[i] if img.cand is None else feats[i][img.cand]
        signals = dict(img.signals)
        if "visual_embeddings" in plan.text_wanted:
            signals["visual_embeddings"] = visual.float()
        requests.append(SelectRequest(image=img, features=visual, k=img.counts[0], signals=signals, project=project))
    plans = dict(zip(pruned, select_images(selector, stage=0, requests=requests), strict=True))
    visuals = {i: r.features for i, r in zip(pruned, requests, strict=True)}
    for i, img in enumerate(fw.images):
        rows = rows_of[i]
        if i not in plans:
            keep[img.sample, rows] = True
            new_feats.append(feats[i])
            sources.append(None)
            continue
        kp, visual = plans[i], visuals[i]
        keep[img.sample, rows[kp.keep_idx]] = True
        tokens = kp.new_feats.to(visual.dtype) if kp.new_feats is not None else visual[kp.keep_idx]
        default = None
        if kp.n_inserted:  # token ids 0..K−1 kept, K..K+E−1 inserted; inserted first at a shared slot
            extra[img.sample].index_add_(0, rows[kp.insert_at], torch.ones_like(kp.insert_at))
            tokens = torch.cat([tokens, kp.inserted.to(visual.dtype)])
            slot = torch.cat([kp.keep_idx * 2 + 1, kp.insert_at * 2])
            default = torch.sort(slot, stable=True).indices
        if kp.order is not None:
            natural = default if default is not None else torch.arange(len(tokens), device=rows.device)
            orders[i] = (natural, kp.order)
            default = kp.order
        new_feats.append(tokens if default is None else tokens[default])
        src = torch.cat([kp.keep_idx, kp.keep_idx.new_full((kp.n_inserted,), -1)])
        sources.append(src if default is None else src[default])

    gather, valid = compact_rows(keep.long() + extra)
    inserted = valid & (copy_rank(gather, valid) < extra.gather(1, gather))
    if orders:  # reference orders: permute each image's slots (ids are reindexed afterwards)
        slots_image = group.vis_image.gather(1, gather).masked_fill(~valid, -1)
        for i, (default, order) in orders.items():
            b = fw.images[i].sample
            slots = (slots_image[b] == i).nonzero().flatten()
            at = torch.empty_like(default)
            at[default] = torch.arange(len(default), device=default.device)  # token id -> its default slot
            src = slots[at[order]]
            gather[b, slots] = gather[b, src]
            inserted[b, slots] = inserted[b, src]
    push_group(
        fw,
        start=0,
        gather=gather,
        valid=valid,
        rule=plan.rule_at[0],
        reindex_all=plan.reindex_all,
        adapter=ad,
        inserted=inserted,
    )
    _rewrite_kwargs(kwargs, ad, gather, valid, inserted, new_feats, sources)


def _rewrite_kwargs(
    kwargs: dict,
    ad: ModelAdapter,
    gather: torch.Tensor,
    valid: torch.Tensor,
    inserted: torch.Tensor,
    new_feats: list[torch.Tensor],
    sources: list[torch.Tensor | None],
) -> None:
    """The model's inputs for the compacted rows: gather (B, L') rows of the input, valid / inserted (B, L') bool;
    new_feats per image (k_i, D) the features of its output tokens, sources per image the candidate behind each."""
    ids = kwargs["input_ids"].gather(1, gather).masked_fill(~valid, ad.pad_token_id)
    kwargs["input_ids"] = ids
    for name in ad.image_kwargs:
        kwargs.pop(name, None)
    ad.note_kept_rows(sources)
    kwargs["mm_encoder_outputs"] = {**(kwargs.get("mm_encoder_outputs") or {}), **ad.features_to_kwargs(new_feats)}
    if kwargs.get("labels") is not None:
        kwargs["labels"] = kwargs["labels"].gather(1, gather).masked_fill(~valid | inserted, -100)
    for name in ("token_type_ids", "mm_token_type_ids"):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name].gather(1, gather) * valid
