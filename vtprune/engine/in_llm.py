"""The in-LLM path: pre-hooks on decoder layers at and after the first `llm:k` stage.

At a prefill, layer k's pre-hook (an `llm:k` stage) selects per image, compacts the kept rows (re-left-padded)
and installs a new group: hidden states, (cos, sin), position ids and the mask gathered to the kept rows, one
(cos, sin) and one mask per layer kind; every later layer of the group gets those instead of the model's
full-length objects. Layer k−1's input is captured for the signals. At a decode step the stage layer rebuilds its
group's mask (and RoPE) for the new rows (`decode.step_group`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.base import ModelAdapter
from . import signals as sig
from .decode import step_group
from .llm_signals import LayerInput, llm_signals
from .plan import HookPlan
from .select import Selector, SelectRequest, select_images
from .sequence import compact_rows, gather_rows, rows_per_image
from .state import ForwardState, RowGroup, push_group


@dataclass(frozen=True, kw_only=True)
class InLLMPath:
    """The decoder-layer pre-hook's work, for one session."""

    adapter: ModelAdapter
    plan: HookPlan
    selector: Selector

    def on_layer(
        self, fw: ForwardState, idx: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        """Layer `idx`'s input (B, L, D) -> the input it runs on; sets its mask / (cos, sin) / ids in `kwargs`."""
        stage = self.plan.stage_at_layer.get(idx)
        if stage is not None:
            if fw.prefill:
                hidden = self._prune(fw, stage, idx, layer, hidden, kwargs)
            else:
                step_group(fw, idx=idx, hidden=hidden, kwargs=kwargs, adapter=self.adapter, plan=self.plan)
        group = fw.group_for(idx)
        if group.in_llm:
            kind = self.plan.kind_of[idx]
            kwargs["attention_mask"] = group.mask[kind]
            kwargs["position_embeddings"] = group.pos_emb[kind]
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = group.step_positions if not fw.prefill else group.positions
        if fw.prefill and idx == 0 and self.plan.capture_layer0:
            _attach_visual_embeddings(fw, hidden)
        if fw.prefill and idx in self.plan.capture_layers:
            fw.captured[idx] = LayerInput(
                layer=layer, hidden=hidden, pos_emb=kwargs["position_embeddings"], mask2d=group.mask2d
            )
        return hidden

    def _prune(self, fw: ForwardState, stage: int, idx: int, layer, hidden, kwargs) -> torch.Tensor:
        """The `llm:k` stage at layer idx = k: select per image, compact, push the new group. -> hidden (B, L', D)."""
        method, plan = self.selector.method, self.plan
        group = fw.groups[-1]
        adaptive = method.adaptive_count  # the method decides the count: `select` runs for every pruned image
        if not adaptive and all(img.counts[stage] >= (img.counts[stage - 1] if stage else img.n) for img in fw.images):
            return hidden  # nobody prunes here: keep the rows (and numerics) exactly as they are
        here_pos = group.pos_emb[plan.kind_of[idx]] if group.in_llm else kwargs["position_embeddings"]
        here = LayerInput(layer=layer, hidden=hidden, pos_emb=here_pos, mask2d=group.mask2d)
        wanted = method.signals(stage)
        signals = llm_signals(fw, adapter=self.adapter, wanted=wanted, layer_idx=idx, here=here)
        keep = group.mask2d.bool() & (group.vis_image < 0)
        replaced = None
        orders: dict[int, torch.Tensor] = {}  # image -> its plan's output order (a reference order)
        pruned, rows_of, requests = [], {}, []
        image_rows = rows_per_image(group.vis_image, len(fw.images))
        for i, img in enumerate(fw.images):
            rows = image_rows[i]
            k = img.counts[stage]
            if k >= (img.n if adaptive else rows.numel()):
                keep[img.sample, rows] = True
                continue
            orig = group.vis_index[img.sample, rows]
            view_signals = {}
            for name, s in signals.items():
                if name in sig.SAMPLE_SIGNALS:
                    view_signals[name] = s[img.sample]
                elif name in sig.ROW_SIGNALS:
                    view_signals[name] = s[img.sample][rows]
                else:
                    view_signals[name] = s[img.sample][..., rows]
            for name in wanted & (sig.TEXT_SIGNALS | sig.VISION_SIGNALS):
                if name in img.signals:  # vision signals are per original candidate, text ones per sample
                    value = img.signals[name]
                    per_candidate = name in sig.VISION_SIGNALS - sig.VIEW_SIGNALS
                    view_signals[name] = value[orig] if per_candidate else value
            if img.embeddings is not None:
                view_signals["visual_embeddings"] = img.embeddings[orig]
            pruned.append(i)
            rows_of[i] = rows
            requests.append(SelectRequest(image=img, features=hidden[img.sample, rows], k=k, signals=view_signals,
                                          original_index=orig))  # fmt: skip
        plans = select_images(self.selector, stage=stage, requests=requests)
        for i, kp in zip(pruned, plans, strict=True):
            img = fw.images[i]
            kept_rows = rows_of[i][kp.keep_idx]
            keep[img.sample, kept_rows] = True
            if kp.new_feats is not None:
                replaced = hidden.clone() if replaced is None else replaced
                replaced[img.sample, kept_rows] = kp.new_feats.to(hidden.dtype)
            if kp.order is not None:
                orders[i] = kp.order
        hidden = replaced if replaced is not None else hidden

        gather, valid = compact_rows(keep)
        if orders:  # each image's kept rows sit in its slots in row order; the plan's order permutes them
            slots_image = group.vis_image.gather(1, gather).masked_fill(~valid, -1)
            for i, order in orders.items():
                b = fw.images[i].sample
                slots = (slots_image[b] == i).nonzero().flatten()
                gather[b, slots] = gather[b, slots[order]]
        new = push_group(
            fw,
            start=idx,
            gather=gather,
            valid=valid,
            rule=plan.rule_at[idx],
            reindex_all=plan.reindex_all,
            adapter=self.adapter,
        )
        new.in_llm = True
        hidden = gather_rows(hidden, gather)
        self._install_rows(fw, group, new, idx, hidden, gather, kwargs)
        return hidden

    def _install_rows(
        self, fw: ForwardState, old: RowGroup, new: RowGroup, idx: int, hidden: torch.Tensor, gather, kwargs: dict
    ) -> None:
        """(cos, sin) and mask of the new group's rows, one per layer kind (one kind for most models): under
        `keep` the rows' own (cos, sin) gathered, else RoPE of the new ids; the mask with the kept image blocks."""
        plan, ad = self.plan, self.adapter
        here = plan.kind_of[idx]
        for kind in plan.kinds:
            if plan.rule_at[idx] == "keep" and (old.in_llm or kind == here):  # the rows' own (cos, sin), gathered
                source = old.pos_emb[kind] if old.in_llm else kwargs["position_embeddings"]
                cos, sin = (t.expand(gather.shape[0], *t.shape[1:]) for t in source)
                new.pos_emb[kind] = (gather_rows(cos, gather), gather_rows(sin, gather))
            else:
                new.pos_emb[kind] = ad.rotary(hidden, new.positions, kind)
            new.mask[kind] = ad.layer_mask(
                hidden, new.mask2d, fw.cache, plan.first_of_kind(idx, kind), blocks=new.vis_image
            )


def _attach_visual_embeddings(fw: ForwardState, hidden: torch.Tensor) -> None:
    """From layer 0's input (B, L, D): each image's candidate rows (n, D) fp32, indexed by original candidate."""
    group = fw.groups[0]
    for i, img in enumerate(fw.images):
        rows = (group.vis_image[img.sample] == i).nonzero().flatten()
        emb = torch.zeros(img.n, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        emb[group.vis_index[img.sample, rows]] = hidden[img.sample, rows].float()
        img.embeddings = emb
