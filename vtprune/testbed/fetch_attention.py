"""Training-only attention targets for fetching the objects a question names (Stage B, `fetch_attention_weight` > 0).

"is the red circle left of the cross ?" needs both objects' places at the answer position. Measured on the best
4-layer model of the thirteenth session (testbed docs, fourteenth session): at the answer position one head of
decoder layer 2 put 0.81 of its attention on the first named object, and no head of any layer more than 0.08 on the
second; a linear read-out of the output found the second object's centre only within 5.4 patches (6 is no
information), and the answers followed that read-out (0.73 right; 0.90 with the objects 8 or more patches apart).
The answer-position read-out (`answer_readout.py`) gives the fetch a gradient only through the residual stream;
these targets give it to heads directly. The trainer uses two heads of one layer: head 0 spreads its attention over
the named object's image tokens (every question naming one), in proportion to the share of the object's pixels each
patch holds (`data_v3.fetch_cover`), and the last head over a relation's second object's; cross-entropy against
that distribution. With the second head's target alone, both heads of the layer moved to the second object and the
first was lost (fourteenth session), hence both.

`TrainConfig.fetch_attention_at = "name"` places the targets where a language model fetches an entity: at the last
word of each object's name in the question ("circle" and "cross" of "is the red circle left of the cross ?"), head 0
of the layer attends to that object's patches (one head serves both names, at different positions), and at the
answer position the last head of the next layer spreads its attention over those name ends (`relay_attention_loss`),
so that each hop is a single-object look-up (fifteenth session). Two more question types get targets: a number
question's tens and units digit (head 0 and the last head, at the answer position: the order of the digits), and
an exist question's asked object at the name's end ("is there a blue cross ?"), or `<s>` alone where it is absent
(a head that finds no match rests on the row's first token; `data_v3.fetch_sink`).

`TrainConfig.fetch_neighbour_layer` adds a third hop for "what colour is the object left of the yellow square ?":
once the named object has reached the answer position (after the relay, or the answer-position fetch), the last
head of that later layer attends there to the left neighbour whose colour is asked (`data_v3.fetch_cover`'s
[:, 2]).

No parameters (`head_attention.py`): the shipped model stays a stock `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import torch

from .head_attention import head_log_attention, target_cross_entropy


def fetch_attention_loss(model, layer: int, head: int | torch.Tensor, layer_input: torch.Tensor,
                         input_ids: torch.Tensor, position_ids: torch.Tensor | None, answer_rows: torch.Tensor,
                         answer_pos: torch.Tensor, cover: torch.Tensor, patch_index: torch.Tensor,
                         sink: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int]:
    """(loss, mean attention mass on the object's tokens, number of targets) for one head (or one per query: head
    [K]) and one object per query.

    layer_input [B, T, D]: `hidden_states[layer - 1]`; input_ids / position_ids [B, T] (None: 0..T-1);
    answer_rows / answer_pos [K]: each query's row and position (the answer's, or a name's end); cover [K, 576]:
    the object's pixel share per patch for that question (`data_v3.fetch_cover`'s [:, m]; all zero: none,
    skipped); patch_index [B, N]: which of the 576 patches each of the row's N image tokens is. A question whose
    object lies wholly in dropped tokens is skipped. sink [K] bool (`data_v3.fetch_sink`): queries whose target is
    `<s>` alone (an absent object).
    """
    image = input_ids == model.config.image_token_id  # [B, T]
    token_of = image.nonzero()[:, 1].view(input_ids.shape[0], -1)  # [B, N]: position of each row's image tokens
    shown = cover.to(input_ids.device).float().gather(1, patch_index[answer_rows])  # [K, N]: share per kept token
    sink = torch.zeros_like(answer_rows, dtype=torch.bool) if sink is None else sink.to(input_ids.device)
    keep = (shown.sum(-1) > 0) | sink
    if not keep.any():
        return layer_input.sum() * 0.0, float("nan"), 0
    rows, pos = answer_rows[keep], answer_pos[keep]  # [K']
    head = head[keep] if isinstance(head, torch.Tensor) else head
    logp = head_log_attention(model, layer, head, layer_input, position_ids, rows, pos)  # [K', T]
    target = torch.zeros_like(logp).scatter_(1, token_of[rows], shown[keep])  # [K', T]
    target[:, 0] += sink[keep].float()  # <s>: an absent object's target
    target = target / target.sum(-1, keepdim=True)
    loss, mass = target_cross_entropy(logp, target)
    return loss, mass, int(rows.numel())


def relay_attention_loss(model, layer: int, head: int, layer_input: torch.Tensor, position_ids: torch.Tensor | None,
                         answer_rows: torch.Tensor, answer_pos: torch.Tensor,
                         sources: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(loss, mean attention mass on the sources, number of targets) for the name-position variant's second hop: at
    each answer position, head `head` of decoder layer `layer` spreads its attention evenly over the question's
    name-end tokens, where the previous layer fetched the named objects.

    layer_input [B, T, D]: `hidden_states[layer - 1]`; answer_rows / answer_pos [K]; sources [K, S] int64: positions
    of the name ends in the answer's row (0: none; a question without any is skipped).
    """
    valid = sources > 0  # [K, S]
    keep = valid.any(-1)
    if not keep.any():
        return layer_input.sum() * 0.0, float("nan"), 0
    rows, pos, sources, valid = answer_rows[keep], answer_pos[keep], sources[keep], valid[keep]
    logp = head_log_attention(model, layer, head, layer_input, position_ids, rows, pos)  # [K', T]
    target = torch.zeros_like(logp).scatter_add_(1, sources, valid.float())  # [K', T]
    target = target / target.sum(-1, keepdim=True)
    loss, mass = target_cross_entropy(logp, target)
    return loss, mass, int(rows.numel())
