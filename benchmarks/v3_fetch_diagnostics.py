"""Does a v3 model fetch both objects a relation names? Its answers against what its residual stream holds.

    python benchmarks/v3_fetch_diagnostics.py runs/u8-final --state runs/u8 [--questions 150]

On relation and leftof questions of the calibration split (seed 20001, never the test split), one per scene, with
the run's training-only answer-position read-out (`answer_readout.py`, in its latest state, `--state RUN`):

- whether the model's answer is right;
- the mean absolute error, in patches, of the read-out's named object after its first layer ("early") and of the
  named and second object from the decoder's output ("late"); 6 patches is what a read-out without information
  scores (the mean distance of a uniform place from the middle), about 1.5 is a fetched object;
- for relations, the answer the late read-out's two centres imply (is the named object's x / y the smaller), how
  often it agrees with the model's answer, and both by the distance between the two objects along the asked axis.

One CPU thread, under a minute for 150 questions per type. docs/testbed.md ("v3 training: fourteenth session")
lists what it measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from vtprune import checkpointing as cpt
from vtprune.testbed.answer_readout import AnswerReadout, answer_positions
from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.data import Packing
from vtprune.testbed.data_v3 import question_batch, vocabulary
from vtprune.testbed.splits import calibration_split

GAPS = ((2, 3), (3, 5), (5, 8), (8, 30))  # patches between the two centres along the asked axis


@torch.no_grad()
def fetch_readings(model, readout: AnswerReadout, qtype: str, questions: int) -> dict[str, np.ndarray]:
    """{"right" [K] bool, "early" [K], "late_named" [K], "late_second" [K] (errors in patches), "target" [K, 4] and
    "late" [K, 4] (centres in [-1, 1]: named x, y, second x, y), "above" [K] bool (the question asks above, not left
    of)} for `questions` questions of `qtype`, one per calibration scene."""
    batch = question_batch(calibration_split(20001), 0, questions, Packing(questions_per_image=1), types=(qtype,))
    rows, pos, slot = answer_positions(batch["labels"], model.config.text_config.eos_token_id, 1)
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"], output_hidden_states=True)
    hidden = out.hidden_states
    right = out.logits[rows, pos].argmax(-1) == batch["labels"][rows, pos + 1]
    target = batch["fetch"][rows, slot].float()  # [K, 4]
    early = readout.named(hidden[readout.first_layer][rows, pos].float())  # [K, 2]
    late = readout.both(hidden[-1][rows, pos].float())  # [K, 4]
    above_id = vocabulary()["above"]
    return {"right": right.numpy(), "target": target.numpy(), "late": late.numpy(),
            "early": ((early - target[:, :2]).abs().mean(1) * 12).numpy(),
            "late_named": ((late[:, :2] - target[:, :2]).abs().mean(1) * 12).numpy(),
            "late_second": ((late[:, 2:] - target[:, 2:]).abs().mean(1) * 12).numpy(),
            "above": (batch["input_ids"][rows] == above_id).any(1).numpy()}


def implied_relation(r: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(the late read-out's implied answer agrees with the true relation [K] bool, gap in patches [K])."""
    axis = r["above"].astype(int)  # 0: x (left of), 1: y (above)
    k = np.arange(len(axis))
    implied = r["late"][k, axis] < r["late"][k, 2 + axis]
    truth = r["target"][k, axis] < r["target"][k, 2 + axis]
    return implied == truth, np.abs(r["target"][k, axis] - r["target"][k, 2 + axis]) * 12


def report(qtype: str, r: dict[str, np.ndarray]) -> None:
    right = r["right"]
    print(f"{qtype}: answer right {right.mean():.2f} (n={len(right)}); read-out error in patches: early named "
          f"{r['early'].mean():.2f}, late named {r['late_named'].mean():.2f}, "
          f"late second {r['late_second'].mean():.2f}")
    if qtype != "relation":
        return
    ok, gap = implied_relation(r)
    print(f"  read-out's implied answer right {ok.mean():.2f}; agrees with the model {(ok == right).mean():.2f}")
    for lo, hi in GAPS:
        m = (gap >= lo) & (gap < hi)
        if m.any():
            print(f"  objects {lo}-{hi} patches apart: n={m.sum()} answer right {right[m].mean():.2f}, read-out "
                  f"right {ok[m].mean():.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model directory or builtin:NAME")
    ap.add_argument("--state", required=True, help="the training run whose latest state holds the read-out")
    ap.add_argument("--questions", type=int, default=150, help="questions per type")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = resolve_model(args.model)
    saved = cpt.load_state(cpt.latest(Path(args.state) / "state", f"{args.state} has no training state"), "state",
                           "cpu")
    weights = saved.get("readout")
    if weights is None:
        raise SystemExit(f"{args.state}'s state has no answer-position read-out (trained without --fetch-weight)")
    first_layer = _first_layer(args.state, model)
    readout = AnswerReadout(model.config.text_config.hidden_size, first_layer, second="second.weight" in weights)
    readout.load_state_dict(weights)
    model.eval()
    for qtype in ("relation", "leftof"):
        report(qtype, fetch_readings(model, readout, qtype, args.questions))


def _first_layer(run: str, model) -> int:
    """The run's fetch layer (train_config.json; 0 there means half the decoder's depth)."""
    import json

    layer = int(json.loads((Path(run) / "train_config.json").read_text()).get("fetch_layer", 0))
    return layer or max(1, model.config.text_config.num_hidden_layers // 2)


if __name__ == "__main__":
    main()
