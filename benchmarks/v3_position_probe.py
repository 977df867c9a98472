"""Where does a v3 model lose an object's position? Linear (x, y) read-outs at object patches, stage by stage.

    python benchmarks/v3_position_probe.py runs/c4x64/model runs/k3/model [--scenes 48] [--questions 150]

For each model: ridge read-outs of the patch's (x, y) (grid position scaled to [0, 1]) from the frozen
penultimate features, from the projector's first layer before and after its activation, and from the projector's
output (what the decoder sees), fitted on the object patches of the first half of the scenes and scored (R², per
axis) on the second half. With `--questions N` it also asks N balanced training-only `side` and `upper` questions
("is the red circle left ?") and reads, at the answer position of every decoder layer's residual stream, the named
object's centre (x, y) (R², 4-fold) and the answer (yes / no, ridge on ±1, 4-fold accuracy): whether the decoder
fetched the object's position at all, or fetched it and failed to use it. Scenes: calibration split 20001 (never
the test split). One CPU thread, a few seconds per model (about 20 s per 100 questions).
docs/testbed.md ("v3 training: fifth session", "sixth session") lists what it measured.
"""

from __future__ import annotations

import argparse

import torch

from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.data_v3 import balanced_samples, dense_batch
from vtprune.testbed.features import vision_features
from vtprune.testbed.questions import Question
from vtprune.testbed.questions_v3 import fetched_objects
from vtprune.testbed.scenes_v3 import IMAGE_SIZE
from vtprune.testbed.splits import calibration_split
from vtprune.testbed.tokenizer import prompt


def ridge_predict(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, ridge: float) -> torch.Tensor:
    """Predictions [T, K] for the rows not in `train` [P] bool from a ridge fit of y [P, K] on x [P, D] (+ bias)."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    a, b = x[train], y.double()[train]
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(x.shape[1], dtype=torch.double), a.T @ b)  # [D + 1, K]
    return x[~train] @ w


def r2(pred: torch.Tensor, y: torch.Tensor) -> list[float]:
    """R² per column of y [T, K]."""
    y = y.double()
    return [round(float(v), 3) for v in 1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)]


def held_out_r2(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, ridge: float = 1e-3) -> list[float]:
    """R² per column of y [P, 2] from a ridge fit of x [P, D] (+ bias) on rows `train` [P] bool, scored on the rest."""
    return r2(ridge_predict(x, y, train, ridge), y[~train])


def fold_predictions(x: torch.Tensor, y: torch.Tensor, folds: int = 4, ridge: float = 10.0):
    """(test rows [N] bool, their predictions [T, K]) for each of `folds` interleaved folds, x [N, D] standardised on
    the fold's training rows, y [N, K]."""
    for f in range(folds):
        test = torch.zeros(len(x), dtype=torch.bool)
        test[f::folds] = True
        mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-6
        yield test, ridge_predict((x - mu) / sd, y, ~test, ridge)


def answer_position(model, processor, n: int) -> None:
    """Per decoder layer: the named object's centre and the yes/no answer read from the answer position."""
    for qtype in ("side", "upper"):
        samples = balanced_samples(calibration_split(20001), n, types=(qtype,))
        hidden, target = [], []
        for start in range(0, len(samples), 16):
            chunk = samples[start:start + 16]
            inputs = processor(images=[s["image"] for s in chunk], text=[prompt(s["question"]) for s in chunk],
                               return_tensors="pt", padding=True)  # left padding: the last position answers
            out = model(**inputs, output_hidden_states=True)
            hidden.append(torch.stack([h[:, -1] for h in out.hidden_states], 1))  # [B, layers + 1, D]
            for s in chunk:
                named, _ = fetched_objects(s["scene"], Question(s["type"], s["question"], s["answer"]))
                obj = s["scene"].objects[named]
                target.append([obj.cx / IMAGE_SIZE, obj.cy / IMAGE_SIZE, 1.0 if s["answer"] == "yes" else -1.0])
        h, t = torch.cat(hidden).double(), torch.tensor(target, dtype=torch.double)  # [N, L + 1, D], [N, 3]
        rows = []
        for layer in range(h.shape[1]):
            scores, hits = [], 0
            for test, pred in fold_predictions(h[:, layer], t):
                scores.append(r2(pred[:, :2], t[test, :2]))  # the centre's (x, y)
                hits += int((pred[:, 2].sign() == t[test, 2]).sum())  # the answer's sign
            r2x, r2y = (round(sum(col) / len(scores), 3) for col in zip(*scores, strict=True))
            rows.append(f"{layer}: x {r2x} y {r2y} answer {round(hits / len(t), 3)}")
        print(f"  {qtype} ({len(t)} questions), answer position by layer (0 = embeddings):", " | ".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model directories (or builtin:NAME) of the same vision tower")
    ap.add_argument("--scenes", type=int, default=48)
    ap.add_argument("--questions", type=int, default=0, help="side / upper questions per type for the answer-position "
                    "read-out (0: skip it)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pv, target = dense_batch(calibration_split(20001), 0, args.scenes)
    objects = target["colour"] > 0  # [n, 576] patches that show an object
    xy = target["xy"][objects]  # [P, 2]
    scene = torch.arange(args.scenes).unsqueeze(1).expand_as(objects)[objects]  # [P]
    train = scene < args.scenes // 2
    print(f"{int(objects.sum())} object patches in {args.scenes} calibration scenes; held-out R² (x, y)")
    with torch.no_grad():
        for path in args.models:
            model, processor = resolve_model(path)
            feats = vision_features(model, pv).float()[objects]  # [P, Dv]
            proj = model.model.multi_modal_projector
            pre = proj.linear_1(feats)
            stages = {"frozen features": feats, "projector linear_1": pre, "after its activation": proj.act(pre),
                      "projector output": proj(feats)}
            print(path, " | ".join(f"{k} {held_out_r2(v, xy, train)}" for k, v in stages.items()))
            if args.questions:
                answer_position(model, processor, args.questions)


if __name__ == "__main__":
    main()
