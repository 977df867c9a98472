"""Training-only read-out of the asked objects' places at the answer position (Stage B, `fetch_weight` > 0).

Relations ("is the red circle left of the cross ?") and "the object left of X" have no first-order signal: the
answer depends on where two objects are, so until the decoder fetches both places into the answer position the
answer loss gives that fetch almost no gradient, and a fresh or continued decoder stays near chance on them
(testbed docs, v3 training, fourth to sixth sessions). This read-out gives the fetch a direct gradient: at each
answer's position (the token that predicts the answer), a linear map of the residual stream after decoder layer
`first_layer` must give the named object's centre, and a linear map of the decoder's output the centres of the
named and of the second object (a relation's other object, leftof's left neighbour;
`questions_v3.fetched_objects`; for a number question its tens and units digit). Questions without such objects
(exist, count) add nothing. With `second=True` a third linear map reads, after `first_layer` too, the second object
where the question names it (a relation's; `questions_v3.names_second`): measured on a model trained without it
(testbed docs, fourteenth session), the output read-out found a relation's named object within 1.6 patches and its
second one only within 5.4, and the model's answers followed that read-out. Added to that finished model, this
map's error stayed at 5-6 patches for 500 steps: it is a gauge of the fetch (the log's "second-cells"), the
attention target (`fetch_attention.py`) is what moved it.
The two linear maps are not part of the shipped model, which stays a stock `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import torch
from torch import nn


def answer_positions(labels: torch.Tensor, eos_id: int, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, position, slot) [K] of every token whose next-token label is an answer (labels [B, T]: -100 except
    answers and their eos); `slot` is the answer's index within its row (the k-th question asked), < `slots`."""
    target = labels[:, 1:]
    sel = (target != -100) & (target != eos_id)  # [B, T - 1]: position t predicts an answer at t + 1
    rows, pos = sel.nonzero(as_tuple=True)
    slot = (sel.long().cumsum(1) - 1)[rows, pos]
    keep = slot < slots
    return rows[keep], pos[keep], slot[keep]


class AnswerReadout(nn.Module):
    """Linear read-outs of object centres from the decoder's residual stream at answer positions."""

    def __init__(self, width: int, first_layer: int, second: bool = False) -> None:
        super().__init__()
        self.first_layer = first_layer
        self.named = nn.Linear(width, 2)  # the named object's (x, y) after `first_layer` decoder layers
        self.both = nn.Linear(width, 4)  # named and second object's (x, y) from the decoder's output
        # a named second object's (x, y) after `first_layer` layers (only built when asked: older states lack it)
        self.second = nn.Linear(width, 2) if second else None

    def loss(self, hidden_states: tuple[torch.Tensor, ...], labels: torch.Tensor, fetch: torch.Tensor,
             eos_id: int, second_named: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int, float]:
        """Mean squared error over the defined targets, the named object's mean absolute x / y error at
        `first_layer` in patches (a progress number for the log), the number of defined targets (data-parallel
        training weighs each process's mean by it), and the named second object's error at `first_layer` in
        patches (NaN without `second` or without such questions).

        hidden_states: the decoder's (embeddings, layer 1, ..., final norm output), each [B, T, D]; labels [B, T];
        fetch [B, Q, 4] (`data_v3.fetch_targets`: centres in [-1, 1], NaN where undefined); second_named [B, Q]
        bool (`data_v3.question_batch`'s "second_named"), needed with `second`.
        """
        rows, pos, slot = answer_positions(labels, eos_id, fetch.shape[1])
        target = fetch[rows, slot].float()  # [K, 4]
        at_first = hidden_states[self.first_layer][rows, pos].float()  # [K, D]
        early = self.named(at_first)  # [K, 2]
        late = self.both(hidden_states[-1][rows, pos].float())  # [K, 4]
        pred = [early, late]
        goal = [target[:, :2], target]
        if self.second is not None:
            if second_named is None:
                raise ValueError("this read-out reads named second objects: give second_named [B, Q]")
            named2 = second_named.to(target.device)[rows, slot]  # [K]
            pred.append(self.second(at_first))  # [K, 2]
            goal.append(torch.where(named2[:, None], target[:, 2:], torch.full_like(target[:, 2:], float("nan"))))
        pred, goal = torch.cat(pred, dim=-1), torch.cat(goal, dim=-1)  # [K, 6 or 8]
        defined = ~torch.isnan(goal)
        if not defined.any():
            return pred.sum() * 0.0, float("nan"), 0, float("nan")
        err = (pred - goal.nan_to_num()).square()
        named = defined[:, 0]
        cells = ((early - target[:, :2]).abs()[named].mean().item() * 12.0) if named.any() else float("nan")
        second_cells = float("nan")
        if self.second is not None and defined[:, 6].any():
            second_cells = (pred[:, 6:] - goal[:, 6:]).abs()[defined[:, 6]].mean().item() * 12.0
        return err[defined].mean(), cells, int(defined.sum()), second_cells
