"""Training-only read-outs for counting (Stage B, `count_weight` > 0).

Counting on shapes-v3 stays approximate (testbed docs, sixth and seventh sessions: most wrong counts are off by one,
counting by colour beats counting by shape): objects cover from under one to sixteen and more patches, so the number
of patches of a colour is not the number of objects, and the answer loss (cross-entropy over the digit tokens) says
nothing about how far a wrong count is. Two direct signals:

- at every image token, after decoder layer `layer`, a linear map must give the patch's share of each object's pixels
  (`scenes_v3.object_share`: [C + S] per patch, one column per colour and per shape); summed over the patches a column
  is the count, so an answer position that adds up the shares of the asked colour's tokens counts objects, not area;
- at each count question's answer position, a linear map of the decoder's output must give the count itself
  (regression: an answer off by one costs less than one off by five).

Both maps are dropped at export: the shipped model stays a stock `LlavaForConditionalGeneration`. The same share
regression (`share_regression`) can also be asked of the vision tower itself when Stage B trains it
(`TrainConfig.tower_share_weight`): its attention is bidirectional, so a patch can see the whole object it belongs to;
with `TrainConfig.tower_count_target = "centre"` the tower classifies `object_centres` instead (one patch per object,
`centre_classification`): its summed probabilities came within 0.3-0.5 objects of every count, where the share
regression stayed 2-3 objects off (testbed docs, eleventh session), but counting answers did not follow within
3,000 steps.
Measured (testbed docs, eighth session): from the same training state, 5,900 steps with `count_weight=1` left
counting at 0.60 on fresh calibration questions, as without it; the share read-out never became accurate after
the first decoder layer. Off by default and not in the `--preset v3` recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .answer_readout import answer_positions
from .questions_v3 import MAX_COUNT


def share_regression(pred: torch.Tensor, goal: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(loss, mean absolute error of the counts the summed shares imply, per scene and channel, in objects) of
    predicted per-patch object shares pred [B, N, C + S] against goal [B, N, C + S] (`scenes_v3.object_share`): the
    squared error summed over the channels, averaged over the tokens that show an object and, separately, over the
    others (background tokens would otherwise dominate the mean)."""
    err = (pred - goal).square().sum(-1)  # [B, N]
    shows = goal.sum(-1) > 0
    loss = sum(err[m].mean() for m in (shows, ~shows) if m.any())
    return loss, (pred.sum(1) - goal.sum(1)).abs().mean().item()


def centre_classification(logits: torch.Tensor, goal: torch.Tensor,
                          sum_weight: float = 0.0) -> tuple[torch.Tensor, float]:
    """(loss, mean absolute error of the counts the summed probabilities imply, per scene and channel, in objects) of
    per-patch logits [B, N, C + S] against goal [B, N, C + S] (`scenes_v3.object_centres`: 1 where a patch holds the
    centre of an object of that colour / shape): binary cross-entropy summed over every entry and divided by the
    number of positive ones (a scene has about 16 among 5,760), so that each object weighs about one while the
    probabilities stay calibrated (a balanced mean over positives and negatives inflates the background's
    probabilities: its summed counts were off by 11-15 objects). sum_weight > 0 adds that weight times the squared
    error of the summed probabilities against the counts, averaged over scenes and channels: the per-patch loss
    treats neighbouring patches' guesses as independent, this one charges the count their sum implies (two
    patches each 0.8 sure of one object's centre cost 0.36)."""
    counts = goal.sum(1)  # [B, C + S] objects per channel (before the clamp: two centres in one patch count twice)
    goal = goal.clamp(max=1.0)  # two objects' centres in one patch: still one positive entry
    err = F.binary_cross_entropy_with_logits(logits, goal, reduction="sum")
    loss = err / goal.sum().clamp_min(1.0)
    implied = torch.sigmoid(logits).sum(1)  # [B, C + S]
    if sum_weight > 0:
        loss = loss + sum_weight * (implied - counts).square().mean()
    return loss, (implied - goal.sum(1)).abs().mean().item()


def tower_count_loss(kind: str, pred: torch.Tensor, batch: dict[str, torch.Tensor],
                     sum_weight: float = 0.0) -> tuple[torch.Tensor, float]:
    """The tower's training-only count decomposition (`TrainConfig.tower_count_target`): "share" regresses
    `object_share`, "centre" classifies `object_centres` (plus `sum_weight` times the summed counts' squared error,
    `TrainConfig.centre_sum_weight`); pred [B, 576, C + S] from the tower's features."""
    if kind == "share":
        return share_regression(pred, batch["share"].to(pred.device).float())
    if kind == "centre":
        return centre_classification(pred, batch["centre"].to(pred.device).float(), sum_weight)
    raise ValueError(f"tower count target {kind!r} is unknown; accepted: share, centre")


class CountReadout(nn.Module):
    """Linear read-outs of per-patch object shares (image tokens) and of the asked count (answer positions)."""

    def __init__(self, width: int, channels: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.share = nn.Linear(width, channels)  # per image token: [C + S] object shares after `layer`
        self.count = nn.Linear(width, 1)  # per count answer: the count / MAX_COUNT, from the decoder's output

    def loss(self, hidden_states: tuple[torch.Tensor, ...], input_ids: torch.Tensor, image_token_id: int,
             patch_index: torch.Tensor, labels: torch.Tensor, share: torch.Tensor, count: torch.Tensor,
             eos_id: int) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """(share loss, count loss, mean absolute error of the counts implied by the summed shares, number of count
        targets). The share loss is the squared error summed over the channels, averaged over the tokens that show
        an object and, separately, over the others (background tokens would otherwise dominate the mean); the
        count loss the mean squared error of count / MAX_COUNT over the count answers (0 when there are none).

        hidden_states: (embeddings, layer 1, ..., final norm output), each [B, T, D]; input_ids / labels [B, T];
        patch_index [B, N]: which of the 576 patches each of the row's N image tokens is; share [B, 576, C + S]
        (`scenes_v3.object_share`); count [B, Q] (`data_v3.count_targets`, NaN where a question is no count).
        """
        b = input_ids.shape[0]
        image = hidden_states[self.layer][input_ids == image_token_id].view(b, patch_index.shape[1], -1)  # [B, N, D]
        goal = share.float().gather(1, patch_index.unsqueeze(-1).expand(-1, -1, share.shape[-1]))  # [B, N, C + S]
        share_loss, implied = share_regression(self.share(image.float()), goal)

        rows, pos, slot = answer_positions(labels, eos_id, count.shape[1])
        target = count[rows, slot].float()  # [K]
        defined = ~torch.isnan(target)
        if not defined.any():
            return share_loss, share_loss * 0.0, implied, 0
        said = self.count(hidden_states[-1][rows[defined], pos[defined]].float()).squeeze(-1)  # [K']
        count_loss = ((said - target[defined]) / MAX_COUNT).square().mean()
        return share_loss, count_loss, implied, int(defined.sum())
