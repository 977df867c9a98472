"""RCP on the built-in benchmark: the trained checkpoint vs the untrained pruner vs FastV, per question type.

    python benchmarks/rcp_builtin.py --checkpoint rcp-64 [--n-per-type 50] [--json out.json]

- `rcp`: the trained checkpoint as saved (its calibrated δ).
- `rcp (untrained)`: the same placement with freshly initialised plug-ins whose learned terms are zero
  (`agg` and the token MLP output are zero, so z = centred attention baseline + β) and no repair (a = 0),
  with its own δ calibrated on the calibration set to the same layer-averaged budget (bisection).
- `fastv`: at the same layer-averaged budget when feasible on the model's depth, else in `retained` mode at
  the budget (the row says which).
- `none`: all tokens.
Held-out questions: seed 10 002 (the model card's), balanced per type; calibration: seed 10 001.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from vtprune.errors import BudgetError
from vtprune.eval.shapes import run_eval
from vtprune.rcp.checkpoint import load_checkpoint, plugins_from_config, save_checkpoint
from vtprune.testbed import resolve_model
from vtprune.testbed.data import EVAL_SEED, HELDOUT_SEED, balanced_samples


def untrained_checkpoint(checkpoint: str, out: Path) -> Path:
    """The checkpoint's configuration with untrained plug-ins: learned pruner terms zero, repair off."""
    _, cfg = load_checkpoint(checkpoint)
    plugins = plugins_from_config(cfg)
    with torch.no_grad():
        for pruner in plugins.pruner.values():
            pruner.agg.weight.zero_()
            pruner.agg.bias.zero_()
            pruner.mlp[-1].weight.zero_()
            pruner.mlp[-1].bias.zero_()
        for dra in plugins.dra.values():
            dra.a.zero_()
    keep = {k: cfg[k] for k in cfg if k not in plugins.config() and k != "format"}
    keep["delta"] = 0.0
    return save_checkpoint(out, plugins, keep)


def calibrated_delta(model, processor, samples, checkpoint: Path, budget: int, iters: int = 14) -> float:
    """δ such that the mean layer-averaged count on `samples` is closest to `budget` (bisection on [−10, 10])."""
    lo, hi, best = -10.0, 10.0, (float("inf"), 0.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        res = run_eval(model, processor, samples, "rcp", budget, options={"checkpoint": str(checkpoint), "delta": mid})
        kept = res["layer_avg_tokens"]
        best = min(best, (abs(kept - budget), mid))
        lo, hi = (mid, hi) if kept < budget else (lo, mid)
    return best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="builtin:shapes-llava")
    ap.add_argument("--n-per-type", type=int, default=50)
    ap.add_argument("--calib-per-type", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, processor = resolve_model(args.model)
    _, cfg = load_checkpoint(args.checkpoint)
    budget = int(round(cfg["budget"])) if cfg["budget"] >= 1 else cfg["budget"]
    held = balanced_samples(HELDOUT_SEED, args.n_per_type)
    calib = balanced_samples(EVAL_SEED, args.calib_per_type)
    rows = [("none", run_eval(model, processor, held, "none", 576))]
    rows.append(("rcp", run_eval(model, processor, held, "rcp", budget, options={"checkpoint": args.checkpoint})))
    with tempfile.TemporaryDirectory() as tmp:
        base = untrained_checkpoint(args.checkpoint, Path(tmp) / "untrained")
        delta = calibrated_delta(model, processor, calib, base, budget)
        opts = {"checkpoint": str(base), "delta": delta}
        rows.append((f"rcp (untrained, δ={delta:.2f})", run_eval(model, processor, held, "rcp", budget, options=opts)))
    try:
        rows.append(("fastv (layer_avg)", run_eval(model, processor, held, "fastv", budget)))
    except BudgetError as err:
        print(f"fastv at a layer-averaged {budget}: {err}")
        res = run_eval(model, processor, held, "fastv", budget, budget_mode="retained", options={"k": 1})
        rows.append(("fastv (retained, k=1)", res))
    types = sorted(rows[0][1]["per_type"])
    print(f"| method | n̄ | retained | overall | {' | '.join(types)} |")
    print("|---|---|---|---|" + "---|" * len(types))
    for name, r in rows:
        per = " | ".join(f"{r['per_type'][t]:.2f}" for t in types)
        print(f"| {name} | {r['layer_avg_tokens']:.1f} | {r['retained_tokens']:.1f} | {r['accuracy']:.3f} | {per} |")
    if args.json:
        out = {name: {k: v for k, v in r.items() if k != "records"} for name, r in rows}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
