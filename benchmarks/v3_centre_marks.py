"""Which objects does the tower's centre classifier miss or count twice?

    python benchmarks/v3_centre_marks.py MODEL --state RUN [--scenes 160] [--mark centre+top+left]

A run with `--tower-count-target centre` trains a per-patch classifier of object centres on the tower's features
(`tower_share` in its state; dropped at export). Summed over a colour's or shape's patches its probabilities are the
count the tower's marks imply. Here each patch's probability in a column is given to the nearest object of that
column (within 2.5 patches; farther: stray; with `--mark`, a run trained with `--count-mark`: nearest to each mark's
point, `scenes_v3.mark_points`, and an object's mass is the mean over the marks), so every object gets a mass that
should be one unit, and the masses are grouped by the object's size, shape, colour, the distance of its centre
(first mark) to the nearest patch border and how crowded the scene is. Calibration split, seed 20001 (never the test
split); one CPU thread, about 4 minutes for 160 scenes.
docs/testbed.md ("v3 training: twentieth session") lists what it measured.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vtprune import checkpointing as cpt
from vtprune.testbed.builtin import resolve_model
from vtprune.testbed.data_v3 import scene_pixels
from vtprune.testbed.features import vision_features
from vtprune.testbed.scenes import CELL, COLOURS, GRID, SHAPES
from vtprune.testbed.scenes_v3 import id_map, mark_points
from vtprune.testbed.splits import calibration_split

FAR = 2.5 * CELL  # pixels: a patch farther than this from every object of its column holds stray mass
GROUPS = {
    "size (patches)": lambda r: next(f"< {b}" for b in (0.7, 1, 1.5, 2.5, np.inf) if r["size"] < b),
    "shape": lambda r: r["shape"],
    "colour": lambda r: r["colour"],
    "mark to a patch border (px)": lambda r: next(f"< {b}" for b in (1, 2, 4, np.inf) if r["border"] < b),
    "objects in the scene": lambda r: f"{(r['objects'] - 3) // 3 * 3 + 3}-{(r['objects'] - 3) // 3 * 3 + 5}",
}


def load(model_dir: str, run: str) -> tuple[nn.Module, nn.Linear]:
    """(model with the run's latest weights, its centre classifier)."""
    model, _ = resolve_model(model_dir)
    saved = cpt.load_state(cpt.latest(Path(run) / "state", f"{run} has no training state"), "state", "cpu")
    model.load_state_dict(saved["model"])
    w = saved["tower_share"]["weight"]
    head = nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict(saved["tower_share"])
    return model.eval(), head


@torch.no_grad()
def object_masses(model, head: nn.Linear, scenes: int,
                  marks: tuple[str, ...] = ("centre",)) -> tuple[list[dict], dict[str, list[float]]]:
    """([{kind, mass, mass_<mark>..., size, shape, colour, border, objects}] per object and kind (colour / shape
    column; mass: the mean over the marks, border: of the first mark's point), stray mass per scene and column by
    kind (the marks' mean)). `head` has M (C + S) outputs for the M `marks` (the run's `--count-mark`)."""
    split = calibration_split(20001)
    width = len(COLOURS) + len(SHAPES)
    cx = (np.arange(GRID * GRID) % GRID + 0.5) * CELL  # [576] patch centres
    cy = (np.arange(GRID * GRID) // GRID + 0.5) * CELL
    records, stray = [], defaultdict(list)
    for start in range(0, scenes, 16):
        idx = list(range(start, min(scenes, start + 16)))
        prob = torch.sigmoid(head(vision_features(model, scene_pixels(split, idx)).float())).numpy()  # [b, 576, M C]
        for j, i in enumerate(idx):
            scene = split.scene(i)
            objs = scene.objects
            if not objs:
                continue
            # per mark [576, n]: each patch's distance to each object's point (an extreme pixel's centre)
            ids = id_map(scene) if any(m != "centre" for m in marks) else None  # drawn once for every mark
            points = [mark_points(scene, m, ids) + (0.5 if m != "centre" else 0.0) for m in marks]  # [n, 2] each
            dists = [np.hypot(cx[:, None] - at[:, 0], cy[:, None] - at[:, 1]) for at in points]
            columns = {"colour": np.array([list(COLOURS).index(o.colour) for o in objs]),
                       "shape": len(COLOURS) + np.array([SHAPES.index(o.shape) for o in objs])}
            for kind, col in columns.items():
                for c in np.unique(col):
                    members = np.nonzero(col == c)[0]
                    per_mark, lost = [], 0.0
                    for m, dist in enumerate(dists):
                        nearest, near_dist = dist[:, members].argmin(1), dist[:, members].min(1)  # [576]
                        p = prob[j, :, m * width + c]
                        lost += float(p[near_dist > FAR].sum()) / len(marks)
                        per_mark.append([float(p[(nearest == k) & (near_dist <= FAR)].sum())
                                         for k in range(len(members))])
                    stray[kind].append(lost)
                    for k, member in enumerate(members):
                        o, (x, y) = objs[member], points[0][member]
                        inside = [x % CELL, CELL - x % CELL, y % CELL, CELL - y % CELL]
                        masses = {f"mass_{mark}": per_mark[m][k] for m, mark in enumerate(marks)}
                        records.append({"kind": kind, "mass": float(np.mean(list(masses.values()))), **masses,
                                        "size": o.size / CELL, "shape": o.shape, "colour": o.colour,
                                        "border": min(inside), "objects": len(objs)})
    return records, stray


def report(records: list[dict], stray: dict[str, list[float]]) -> None:
    for kind in ("colour", "shape"):
        rows = [r for r in records if r["kind"] == kind]
        mass = np.array([r["mass"] for r in rows])
        print(f"== {kind} columns: {len(rows)} objects, mass {mass.mean():.3f} sd {mass.std():.3f}; stray mass per "
              f"scene and column {np.mean(stray[kind]):.3f}")
        each = sorted(k for k in rows[0] if k.startswith("mass_")) if rows else []
        if len(each) > 1:  # several marks: each one's masses, and how their errors go together
            per = np.array([[r[k] for k in each] for r in rows]).T  # [M, objects]
            print("  per mark: " + ", ".join(f"{k[5:]} {m.mean():.3f} sd {m.std():.3f}"
                                             for k, m in zip(each, per, strict=True)))
            print(f"  correlation of the marks' errors: {np.round(np.corrcoef(per), 2).tolist()}")
        for title, key in GROUPS.items():
            groups = defaultdict(list)
            for r in rows:
                groups[key(r)].append(r["mass"])
            print(f"  by {title}")
            for name in sorted(groups):
                m = np.array(groups[name])
                print(f"    {name:12s} n {len(m):4d}  mass {m.mean():.3f}  sd {m.std():.3f}  "
                      f"off by > 0.5: {np.mean(np.abs(m - 1) > 0.5):.3f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="model directory or builtin:NAME (its architecture; the run's weights replace it)")
    ap.add_argument("--state", required=True, help="a run trained with --tower-count-target centre")
    ap.add_argument("--scenes", type=int, default=160)
    ap.add_argument("--mark", default="centre", help="the run's --count-mark (marks joined by '+')")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    report(*object_masses(*load(a.model, a.state), a.scenes, tuple(a.mark.split("+"))))


if __name__ == "__main__":
    main()
