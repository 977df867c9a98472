"""Grow a 4-layer v3 model to the 32-layer organism: the chain's `grown` phase, then its `deep` phase's Stage C with
the feature-drift penalty and no Stage-B steps (twenty-first session: the deep Stage B never gained after Stage C,
and with the penalty the grown model keeps the 4-layer model's accuracy).

    python benchmarks/v3_deep_from.py MODEL OUT [--threads 1] [--placement spread_next] [--cls-drift-weight 50] \
        [--cls-steps 0]

`--placement` is `grow.grow_decoder`'s (the chain's: "spread"; the preview `builtin:shapes-v3-llava` uses
"spread_next", whose zero-output copies attend as the next trained layer does). `--cls-drift-weight` is Stage C's
feature-drift penalty (default the chain's, `chain_v3.CLS_DRIFT_WEIGHT`; the preview since the twenty-sixth session
uses 50: docs/testbed.md); `--cls-steps 0` skips Stage C, for a model whose [CLS] embedding was tuned before
its decoder was adapted to it (`vtprune testbed soup-rounds --cls-drift`). Writes OUT/grown (the grown model)
and OUT/deep (a training run: OUT/deep/model, its train_summary.json with Stage
C's log, which `python -m vtprune.testbed.card OUT/deep` reads). Resumable: a finished step is skipped.
The preview `builtin:shapes-v3-llava` is made by `benchmarks/v3_install_preview.sh`, which calls this (twenty-sixth
session: `python benchmarks/v3_deep_from.py benchmarks/checkpoints/shapes-v3-soup4 runs/soup4c50n --placement
spread_next --cls-drift-weight 50`; before it, u25's growth with the default penalty); `shapes-v3-u22-c20` (in git
history) was made by a `python -c` line doing what this does with "spread".
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from vtprune.testbed import chain_v3
from vtprune.testbed.grow import PLACEMENTS, grow_saved
from vtprune.testbed.train import train


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a 4-layer v3 model directory")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--placement", choices=PLACEMENTS, default="spread", help="grow.grow_decoder's placement")
    ap.add_argument("--cls-drift-weight", type=float, default=chain_v3.CLS_DRIFT_WEIGHT,
                    help="Stage C's feature-drift penalty (TrainConfig.cls_drift_weight)")
    ap.add_argument("--cls-steps", type=int, default=None,
                    help="Stage C's steps (default: the deep phase's; 0: no Stage C, the [CLS] embedding as it is)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    grown = out / "grown"
    if not (grown / "config.json").exists():
        grow_saved(a.model, grown, chain_v3.DEEP_LAYERS, a.placement, replace=True)
    if (out / "deep" / "model" / "config.json").exists():
        print(f"{out / 'deep' / 'model'} exists")
        return
    deep = {p.name: p for p in chain_v3.phases()}["deep"]
    cfg = replace(deep.config(str(grown)), steps_b=0, threads=a.threads, bf16=False,
                  cls_drift_weight=a.cls_drift_weight)
    if a.cls_steps is not None:
        if a.cls_steps < 0:
            raise SystemExit(f"--cls-steps must be >= 0, got {a.cls_steps}")
        cfg = replace(cfg, cls_steps=a.cls_steps)
    print(cfg)
    train(out / "deep", cfg, progress=False)


if __name__ == "__main__":
    main()
