"""Does a v3 model's decoder look at the objects a question names? Attention mass per decoder layer and head.

    python benchmarks/v3_attention_mass.py runs/k9/model [--state runs/k12] [--types colour,relation,leftof]
        [--per-type 40]

For balanced calibration questions (split 20001, never the test split), the share of the answer position's
attention to image tokens that falls on the patches of the named object ("A") and of the second object ("B": a
relation's other object, leftof's left neighbour; `questions_v3.fetched_objects`), per decoder layer and head,
averaged over the questions, plus the share of that position's attention that goes to image tokens at all. An
object touches about 6 of the 576 patches, so attention spread evenly over the image puts about 0.01 on it.
`--state RUN` loads the latest training state of a run (`RUN/state/`) into the model first (the model directory
gives the processor and the architecture). One CPU thread, about a minute for 120 questions.
docs/testbed.md ("v3 training: seventh session") lists what it measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from vtprune import checkpointing as cpt
from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.data_v3 import balanced_samples
from vtprune.testbed.questions import Question
from vtprune.testbed.questions_v3 import fetched_objects
from vtprune.testbed.scenes_v3 import id_map, patch_coverage
from vtprune.testbed.splits import calibration_split
from vtprune.testbed.tokenizer import prompt


def attention_mass(model, processor, samples: list[dict]) -> dict[tuple[str, str], np.ndarray]:
    """{(type, "A" | "B"): [n, layers, heads, 2]}: per question, layer and head, (share of the image attention on
    the object's patches, share of all attention on image tokens) at the answer position."""
    out: dict[tuple[str, str], list[np.ndarray]] = {}
    image_id = model.config.image_token_id
    for sample in samples:
        objects = fetched_objects(sample["scene"], Question(sample["type"], sample["question"], sample["answer"]))
        coverage = patch_coverage(id_map(sample["scene"]))  # [576, 256] pixels of each id in each patch
        inputs = processor(images=[sample["image"]], text=[prompt(sample["question"])], return_tensors="pt")
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions  # layers x [1, H, T, T]
        image = (inputs["input_ids"][0] == image_id).nonzero()[:, 0]  # [576] positions of the image tokens
        weights = torch.stack([a[0, :, -1, image] for a in attentions]).float()  # [L, H, 576]
        on_image = weights.sum(-1)  # [L, H]
        for tag, index in zip("AB", objects, strict=True):
            if index is None:
                continue
            on = torch.from_numpy(coverage[:, index + 1] > 0)  # id map: object i is drawn as i + 1
            share = weights[..., on].sum(-1) / on_image.clamp_min(1e-9)
            out.setdefault((sample["type"], tag), []).append(torch.stack([share, on_image], -1).numpy())
    return {k: np.stack(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an exported v3 model directory")
    ap.add_argument("--state", default=None, help="a training run whose latest state to load into the model")
    ap.add_argument("--types", default="colour,relation,leftof")
    ap.add_argument("--per-type", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, processor = resolve_model(args.model)
    model = model.float().eval()
    if args.state:
        folder = cpt.latest(Path(args.state) / "state", "")
        if folder is None:
            raise SystemExit(f"no training state in {args.state}/state")
        model.load_state_dict(cpt.load_state(folder, "state", "cpu")["model"])
        print(f"state: {folder}")
    model.set_attn_implementation("eager")  # attention weights need the eager kernel
    samples = balanced_samples(calibration_split(20001), args.per_type, types=tuple(args.types.split(",")))
    for (qtype, tag), v in sorted(attention_mass(model, processor, samples).items()):
        for layer in range(v.shape[1]):
            share = " ".join(f"{x:.2f}" for x in v[:, layer, :, 0].mean(0))
            image = " ".join(f"{x:.2f}" for x in v[:, layer, :, 1].mean(0))
            print(f"{qtype:9s} {tag} layer {layer}: on object per head {share} | on image {image} (n {len(v)})")


if __name__ == "__main__":
    main()
