"""Where does a v3 model lose an object's position? Linear (x, y) read-outs at object patches, stage by stage.

    python benchmarks/v3_position_probe.py runs/c4x64/model runs/k3/model [--scenes 48]

For each model: ridge read-outs of the patch's (x, y) (grid position scaled to [0, 1]) from the frozen
penultimate features, from the projector's first layer before and after its activation, and from the projector's
output (what the decoder sees), fitted on the object patches of the first half of the scenes and scored (R², per
axis) on the second half. Scenes: calibration split 20001 (never the test split). One CPU thread, a few seconds
per model. docs/testbed.md ("v3 training: fifth session") lists what it measured.
"""

from __future__ import annotations

import argparse

import torch

from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.data_v3 import dense_batch
from vtprune.testbed.features import vision_features
from vtprune.testbed.splits import calibration_split


def held_out_r2(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, ridge: float = 1e-3) -> list[float]:
    """R² per column of y [P, 2] from a ridge fit of x [P, D] (+ bias) on rows `train` [P] bool, scored on the rest."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    y = y.double()
    a, b = x[train], y[train]
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(x.shape[1], dtype=torch.double), a.T @ b)  # [D + 1, 2]
    test = ~train
    res = ((x[test] @ w - y[test]) ** 2).sum(0)
    tot = ((y[test] - y[test].mean(0)) ** 2).sum(0)
    return [round(float(v), 3) for v in 1 - res / tot]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model directories (or builtin:NAME) of the same vision tower")
    ap.add_argument("--scenes", type=int, default=48)
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
            model, _ = resolve_model(path)
            feats = vision_features(model, pv).float()[objects]  # [P, Dv]
            proj = model.model.multi_modal_projector
            pre = proj.linear_1(feats)
            stages = {"frozen features": feats, "projector linear_1": pre, "after its activation": proj.act(pre),
                      "projector output": proj(feats)}
            print(path, " | ".join(f"{k} {held_out_r2(v, xy, train)}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
