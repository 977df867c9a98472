"""Where does a v3 model's counting fail: in the tower's centre marks, or in the decoder head that adds them up?

    python benchmarks/v3_count_diagnostics.py runs/u7/model --layer 3 [--state runs/u7] [--questions 200]

On count questions of the calibration split (seed 20001, never the test split), one answer per scene:

- **head**: head `--head` of decoder layer `--layer` (1-based; the one `--count-attention-weight` trains) at the
  answer position. Its attention is split into `<s>`, the asked colour's / shape's centre patches
  (`scenes_v3.object_centres`), the other patches of those objects, patches of other objects, background and text;
  the count read off its weight m on `<s>` is round(w (1 - m) / m) (a head that attends to `<s>` with w times the
  weight of each of the k centres has m = w / (w + k); w = `--sink-weight`, the run's `--count-sink-weight`, 1 by
  default: m = 1 / (k + 1)).
- **tower** (with `--state RUN`: the run's training-only centre classifier, `tower_share`, lives in its state): the
  count the tower's centre probabilities imply, summed over the 576 patches (and counted above 0.5), against the
  answer: the most any decoder could count from those marks.

One CPU thread, about a minute for 200 questions. docs/testbed.md ("v3 training: thirteenth session") lists what it
measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vtprune import checkpointing as cpt
from vtprune.testbed.answer_readout import answer_positions
from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.data import Packing
from vtprune.testbed.data_v3 import question_batch
from vtprune.testbed.splits import calibration_split
from vtprune.testbed.train import vision_features

PARTS = ("bos", "centre", "target_other", "other_object", "background", "text")


def count_batch(model, questions: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    """(batch, rows [K], answer positions [K], counted `object_centres` column [K], count [K]) for `questions` count
    questions, one per calibration scene."""
    batch = question_batch(calibration_split(20001), 0, questions, Packing(questions_per_image=1), with_counts=True,
                           types=("count",))
    rows, pos, slot = answer_positions(batch["labels"], model.config.text_config.eos_token_id, 1)
    return batch, rows, pos, batch["count_channel"][rows, slot], batch["count"][rows, slot]


@torch.no_grad()
def head_attention(model, layer: int, head: int, questions: int) -> dict[str, np.ndarray]:
    """{"count": [K], PARTS...: [K]}: the answer position's attention of one head, split by what the keys show
    (the parts sum to 1 per question). Needs eager attention (`model.set_attn_implementation("eager")`)."""
    batch, rows, pos, chan, count = count_batch(model, questions)
    image = batch["input_ids"] == model.config.image_token_id  # [B, T]
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"], output_attentions=True)  # the stock forward
    attn = out.attentions[layer - 1][rows, head, pos].float()  # [K, T]
    first = image.float().argmax(1)[rows]  # [K]: every row's image tokens are contiguous, all 576 shown
    idx = first[:, None] + torch.arange(576)[None]  # [K, 576]
    on_image = attn.gather(1, idx)  # [K, 576]
    centre = batch["centre"][rows, :, chan] > 0  # [K, 576]
    target = batch["share"][rows, :, chan] > 0  # patches showing an object of the asked colour / shape
    anything = batch["share"][rows].sum(-1) > 0  # patches showing any object
    parts = {
        "bos": attn[:, 0],
        "centre": (on_image * centre).sum(1),
        "target_other": (on_image * (target & ~centre)).sum(1),
        "other_object": (on_image * (anything & ~target & ~centre)).sum(1),
        "background": (on_image * (~anything & ~centre)).sum(1),
    }
    parts["text"] = attn.sum(1) - on_image.sum(1) - attn[:, 0]
    result = {k: v.numpy() for k, v in parts.items()}
    result["count"] = count.numpy()
    return result


@torch.no_grad()
def tower_counts(model, centre_head: nn.Module, questions: int) -> dict[str, np.ndarray]:
    """{"count": [K], "summed": [K], "marked": [K]}: the tower's centre probabilities of the asked column, summed
    over the patches and counted above 0.5."""
    batch, rows, _, chan, count = count_batch(model, questions)
    prob = torch.sigmoid(centre_head(vision_features(model, batch["pixel_values"]).float()))  # [B, 576, C + S]
    asked = prob[rows, :, chan]  # [K, 576]
    return {"count": count.numpy(), "summed": asked.sum(1).numpy(),
            "marked": (asked > 0.5).sum(1).numpy()}


def _by_count(k: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(count, mask [K]) for every count 0..9 that some question has."""
    return [(v, k == v) for v in range(10) if (k == v).any()]


def _report_head(r: dict[str, np.ndarray], sink_weight: float = 1.0) -> None:
    k = r["count"]
    bos = np.maximum(r["bos"], 1e-3)
    read = np.clip(np.round(sink_weight * (1 - bos) / bos), 0, 9)
    right = read == k
    near = (np.abs(read - k) <= 1).mean()
    print(f"head: count read off the <s> weight right {right.mean():.2f}, within one {near:.2f} ({len(k)} questions)")
    for part in PARTS:
        print(f"  {part:13s} {r[part].mean():.3f} (read right {r[part][right].mean():.3f}, wrong "
              f"{r[part][~right].mean() if (~right).any() else float('nan'):.3f})")
    for v, m in _by_count(k):
        print(f"  k={v} n={m.sum():3d} <s> {r['bos'][m].mean():.3f} (even: {sink_weight / (sink_weight + v):.3f},"
              f" sd {r['bos'][m].std():.3f})"
              f" centres {r['centre'][m].mean():.3f} elsewhere {1 - r['bos'][m].mean() - r['centre'][m].mean():.3f}"
              f" read right {right[m].mean():.2f}")


def _report_tower(r: dict[str, np.ndarray]) -> None:
    k = r["count"]
    summed = np.round(r["summed"])
    print(f"tower: summed centre probabilities right {(summed == k).mean():.2f}, within one "
          f"{(np.abs(summed - k) <= 1).mean():.2f}; patches above 0.5 right {(r['marked'] == k).mean():.2f}")
    for v, m in _by_count(k):
        print(f"  k={v} n={m.sum():3d} summed {r['summed'][m].mean():.2f} sd {r['summed'][m].std():.2f}"
              f" right {(summed[m] == v).mean():.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model directory or builtin:NAME")
    ap.add_argument("--layer", type=int, required=True, help="decoder layer of the counting head (1-based)")
    ap.add_argument("--head", type=int, default=0)
    ap.add_argument("--state", default="", help="a training run's directory: load its latest state, report the tower")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--sink-weight", type=float, default=1.0,
                    help="the run's --count-sink-weight: the target's weight on <s> relative to each centre")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = resolve_model(args.model)
    centre_head = None
    if args.state:
        saved = cpt.load_state(cpt.latest(Path(args.state) / "state", f"{args.state} has no training state"),
                               "state", "cpu")
        model.load_state_dict(saved["model"])
        w = saved["tower_share"]["weight"]
        centre_head = nn.Linear(w.shape[1], w.shape[0])
        centre_head.load_state_dict(saved["tower_share"])
    model.eval().set_attn_implementation("eager")
    _report_head(head_attention(model, args.layer, args.head, args.questions), args.sink_weight)
    if centre_head is not None:
        _report_tower(tower_counts(model, centre_head, args.questions))


if __name__ == "__main__":
    main()
