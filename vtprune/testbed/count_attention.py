"""Training-only attention target for counting (Stage B, `count_attention_weight` > 0).

Counting on shapes-v3 stayed at 0.3-0.5 with counts 2-8 mostly off by one or two (testbed docs, sixth to eleventh
sessions) although the tower marks every object's centre patch (`TrainConfig.tower_count_target = "centre"`: its
summed probabilities come within 0.3-0.5 objects of every count). Softmax attention averages, so an answer position
that attends to the matching tokens alone learns what they show, not how many there are. A head counts when it
attends equally to the k matching tokens and to one fixed token (the row's first, `<s>`): the weight on `<s>` is then
1 / (k + 1), exact for every k, and a later layer reads it off. This module gives that head its target directly: at
each count question's answer position, one head of decoder layer `layer` (1-based) must put its attention uniformly
on `<s>` and on the image tokens holding the centre of an object of the asked colour or shape
(`scenes_v3.object_centres`); cross-entropy against that distribution over the causal keys.

Measured (testbed docs, twelfth session): the head learns the target (its weight on `<s>` tracks 1 / (k + 1),
correlation 0.97) but not yet precisely (read off directly, 0.51 of counts right); added to a decoder that already
counted it left counting unchanged (0.39 vs 0.42), while in the chain's small phase, where the decoder learns every
type from the start, counting rose from 0.26 to 0.48 on the same 100 calibration questions (p = 0.0007). Thirteenth
session: that chain's model, trained 3,000 more steps with the target, reads 0.76 of counts right off the head
(`benchmarks/v3_count_diagnostics.py`) and answers 0.65 of them.

`TrainConfig.count_attention_at = "name"` moves the target from the answer position to the counted phrase's last
word ("objects" of "how many green objects are there ?", `data_v3.count_offsets`), where the name variant of the
fetch targets (`fetch_attention.py`) looks up a named object, and that variant's relay carries it to the answer
position: every look-up then takes the same two hops (sixteenth session; not yet measured).

`TrainConfig.count_attention_unit = "object"` replaces the centre patches with whole objects
(`grouped_cross_entropy`): the head's attention is summed over each counted object's patches
(`scenes_v3.object_groups`) and each sum must be one unit, wherever within the object it falls. Seventeenth session:
the centre target's error is per-object noise (each object adds 0.75 of a unit through its centre and 0.2 through its
other patches, varying), and half of the objects' centres lie within 2 px of a patch border, where "the centre
patch" is a coin toss. Measured (u11 against u9, the same start and steps): counting 0.60 against 0.62, and the
count read off the head as noisy as before (standard deviation 0.71 against 0.72 objects): the border is not where
the noise comes from. Off by default, not in the chain.

Nothing here has parameters (`head_attention.py`), so the shipped model stays a stock `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import torch

from .head_attention import head_log_attention, image_token_values, target_cross_entropy


def count_attention_loss(model, layer: int, head: int, layer_input: torch.Tensor, input_ids: torch.Tensor,
                         position_ids: torch.Tensor | None, answer_rows: torch.Tensor, answer_pos: torch.Tensor,
                         channel: torch.Tensor, centre: torch.Tensor, patch_index: torch.Tensor,
                         sink_weight: float = 1.0, groups: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, float, int]:
    """(loss, mean attention mass on the target tokens, number of count answers) for one head.

    sink_weight w: the target's weight on `<s>` relative to each centre token, so that `<s>` gets w / (w + k). w = 1
    gives 1 / (k + 1), whose steps shrink to 0.011 between k = 8 and 9; w near 4-9 widens the high counts' steps to
    0.026-0.029 (a later layer reads the weight off a mixture of values, so the step is what it must resolve) at
    the price of the low counts' (0.2 between k = 0 and 1 at w = 4, 0.5 at w = 1).

    layer_input [B, T, D]: the input of decoder layer `layer` (1-based; `hidden_states[layer - 1]`); input_ids /
    position_ids [B, T] (None: 0..T-1); answer_rows / answer_pos / channel [K]: each answer position's row, position
    and counted `object_centres` column (-1: no count question, skipped); centre [B, 576, C + S]
    (`scenes_v3.object_centres`); patch_index [B, N]: which of the 576 patches each of the row's N image tokens is.
    groups [B, 576, C + S] (`scenes_v3.object_groups`; None: the centre target): the per-object target instead, whose
    unit is each counted object's summed attention over its shown tokens (`grouped_cross_entropy`).
    """
    keep = channel >= 0
    rows, pos, chan = answer_rows[keep], answer_pos[keep], channel[keep]  # [K]
    if rows.numel() == 0:
        return layer_input.sum() * 0.0, float("nan"), 0
    logp = head_log_attention(model, layer, head, layer_input, position_ids, rows, pos)  # [K, T]
    if groups is not None:
        owner = image_token_values(groups, input_ids, model.config.image_token_id, patch_index)  # [B, T, C + S]
        return (*grouped_cross_entropy(logp, owner[rows, :, chan].long(), sink_weight), int(rows.numel()))
    # target: <s> (position 0) and the image tokens at the asked column's centre patches, each with its units (two
    # centres in one patch: 2; `TrainConfig.centre_spread`: an object's unit split over the patches it overlaps)
    goal = image_token_values(centre.float(), input_ids, model.config.image_token_id, patch_index)  # [B, T, C + S]
    target = goal[rows, :, chan]  # [K, T]
    target[:, 0] = sink_weight
    target = target / target.sum(-1, keepdim=True)
    loss, mass = target_cross_entropy(logp, target)
    return loss, mass, int(rows.numel())


def grouped_cross_entropy(logp: torch.Tensor, owner: torch.Tensor, sink_weight: float) -> tuple[torch.Tensor, float]:
    """(loss, mean attention mass on `<s>` and the counted objects) of the per-object count target. logp [K, T]: a
    head's log attention at K count answers; owner [K, T] int64: the counted object each key token shows (1..n; 0: a
    token of anything else, text included). The head's attention is summed per object and over the rest into masses
    m [K, n + 2] (`<s>` = key 0 has its own group); the target gives `<s>` w and each counted object shown by at
    least one token 1 (normalised), the rest 0; loss = -sum t log m. It is indifferent to where within an object the
    attention goes: only each object's total must be one unit."""
    k = logp.shape[0]
    groups = int(owner.max()) + 2 if owner.numel() else 2  # 0: the rest, 1..n: objects, n + 1: <s>
    key = owner.clone()
    key[:, 0] = groups - 1
    probs = logp.exp()  # [K, T]: 0 past the query
    mass = torch.zeros(k, groups, dtype=probs.dtype, device=probs.device).scatter_add(1, key, probs)  # [K, G]
    shown = torch.zeros(k, groups, device=probs.device).scatter_add(1, key, torch.ones_like(probs)) > 0  # [K, G]
    target = shown.float()
    target[:, 0] = 0.0  # nothing of the rest
    target[:, -1] = sink_weight
    target = target / target.sum(-1, keepdim=True)
    loss = -(target * mass.clamp_min(1e-30).log()).sum(-1).mean()
    return loss, float((mass.detach() * (target > 0)).sum(-1).mean())
