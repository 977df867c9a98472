"""DCP-Prune on the built-in benchmark v3 (issue 22, item 2): τ_κ calibration, the λ_ctx × recovery sweep on
the calibration split, and the recovery-vs-anchors-only report on the held-out test split.

    python benchmarks/dcp_sweep_v3.py calibrate --write   # τ_κ of the default config -> vtprune/assets/dcp_tau.json
    python benchmarks/dcp_sweep_v3.py sweep               # λ_ctx ∈ {.15,.25,.35,.5} × recovery, calibration split
    python benchmarks/dcp_sweep_v3.py report              # mass vs none at 192/128/64/32/16, 3 test seeds

Protocol (Our decision, stated with the numbers):
- τ_κ depends on the recovery rule (κ_A is measured on the recovered tokens), so every configuration runs with
  its own τ_κ, calibrated by the spec's rule (90th percentile of κ_A at ρ = 1/9) on scenes 0..n_images−1 of the
  calibration split. The report's default configuration uses the shipped table entry when the model has one.
- The sweep reads only the calibration split (`@calibration_routine`: the test split raises `SplitError`); the
  report reads only the test split and changes nothing.
- Accuracy: the testbed's scorer (first generated token restricted to the v3 answer words) with DCP-Prune applied
  at the budget (tokens entering the LLM); Wilson 95 % intervals per seed and pooled over the three test seeds;
  mass vs none is also compared pair-wise on the same questions (discordant pairs).
`--model` takes builtin:NAME, a saved model directory, or `fresh:v3` / `fresh:tiny` (untrained, smoke tests).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ..methods.dcp_prune import DCPPrune, DCPPruneConfig, shipped_tau_kappa
from ..shipped import BUILTIN_RECIPES
from ..stats import wilson
from ..testbed.data_v3 import balanced_samples
from ..testbed.splits import Split, calibration_routine, calibration_split, heldout_splits, parse_split
from .dcp import BUILTIN_PROMPT, BUILTIN_V3, BUILTIN_V3_KEY, calibrate_builtin, model_key, write_shipped_tau, write_tau

DEFAULT_MODEL = "builtin:" + BUILTIN_V3
SWEEP_CAPS = (0.05, 0.1, 0.15, 0.25, 0.35)
SWEEP_RECOVERIES = ("mass", "none", "uniform")
SWEEP_BUDGETS = (192, 128, 64, 32, 16)
#: the sweep's default questions: calibration seed 20001, not the τ_κ calibration's scenes of seed 20000
SWEEP_SPLIT, SWEEP_PER_TYPE, SWEEP_DEFAULT_RECOVERIES = "calibration:20001", 100, ("mass", "none")
REPORT_BUDGETS = (192, 128, 64, 32, 16)
OUT = "vtprune-out/dcp_v3"
#: What creates the v3 asset the commands default to (docs/testbed.md, "v3").
CREATE_V3 = BUILTIN_RECIPES[BUILTIN_V3]


def load_model(spec: str):
    """(model, processor, table key) for builtin:NAME, a directory, or fresh:v3 / fresh:tiny (untrained)."""
    from ..testbed import data_v3

    if spec.startswith("fresh:"):
        from ..testbed.train_v3 import TINY_V3

        size = {"v3": None, "tiny": TINY_V3}.get(spec[len("fresh:"):], "bad")
        if size == "bad":
            raise SystemExit(f"unknown model {spec!r} (accepted: builtin:NAME, a directory, fresh:v3, fresh:tiny)")
        torch.manual_seed(0)
        return data_v3.build_model(size, seed=0).eval(), data_v3.build_processor(), spec
    from ..errors import VtpruneError
    from ..eval.shapes import load_model

    try:
        model, processor = load_model(spec)
    except VtpruneError as err:  # e.g. a missing built-in asset: say what creates it
        raise SystemExit(f"{err}; create it with: {CREATE_V3}") from None
    return model, processor, model_key(model)


def config_name(recovery: str, cap: float | None) -> str:
    return f"{recovery}(λ={cap:g})" if recovery == "mass" else recovery


def tau_for(model, processor, key: str, recovery: str, cap: float, n_images: int, batch: int,
            split: Split | None = None, use_table: bool = True) -> tuple[float, str]:
    """(τ_κ, source) of one configuration: the table's value for `key` when it is the default configuration and
    `use_table`, else calibrated now on the calibration split ("calibrated (this run)")."""
    default = DCPPruneConfig()
    if use_table and recovery == default.recovery and cap == default.context_cap:
        value = shipped_tau_kappa(key)
        if value is not None:
            return value, "calibrated"
    tau = calibrate_builtin(split or calibration_split(), model=model, processor=processor, n_images=n_images,
                            batch_size=batch, recovery=recovery, context_cap=cap)
    return tau, "calibrated (this run)"


def score(model, processor, samples: list[dict], budget: int | None, batch: int = 16, **options) -> dict:
    """Accuracy of DCP-Prune (options) at `budget` visual tokens (None: the unpruned model) on `samples`, with
    its Wilson interval, the TATCS share and the median κ_A from `last_run`, and the per-question outcomes."""
    import vtprune

    from ..testbed.evaluate import evaluate
    from ..testbed.questions_v3 import answer_vocabulary

    branches: list[str] = []
    kappas: list[float] = []

    def collect(_records: list[dict]) -> None:
        for s in vtprune.last_run(model).samples:
            for info in s.method_info:
                if info is not None:
                    branches.append(info["branch"])
                    kappas.append(info["kappa_a"])

    t0 = time.perf_counter()
    if budget is None:
        res = evaluate(model, processor, samples, batch_size=batch, answers=answer_vocabulary())
        info = {}
    else:
        method = DCPPrune(DCPPruneConfig(**options))
        with vtprune.pruned(model, method, budget):
            res = evaluate(model, processor, samples, batch_size=batch, answers=answer_vocabulary(), on_batch=collect)
        info = method.record_info()
    k, n = sum(r["correct"] for r in res["records"]), res["n"]
    lo, hi = wilson(k, n)
    return {
        "budget": budget, **info, "k": k, "n": n, "accuracy": k / max(n, 1), "ci95": [lo, hi],
        "tatcs_share": branches.count("TATCS") / len(branches) if branches else None,
        "kappa_a_median": statistics.median(kappas) if kappas else None,
        "per_type": res["per_type"], "seconds": round(time.perf_counter() - t0, 2),
        "correct": "".join("1" if r["correct"] else "0" for r in res["records"]),
    }  # fmt: skip


@calibration_routine
def sweep(model, processor, key: str, split: Split, per_type: int = 30, budgets=SWEEP_BUDGETS, caps=SWEEP_CAPS,
          recoveries=SWEEP_RECOVERIES, n_images: int = 256, batch: int = 16, log=print) -> dict:
    """λ_ctx × recovery on the calibration split: every configuration with its own τ_κ (calibrated on the same
    split), accuracy at each budget. "none" and "uniform" do not read λ_ctx and run once. -> JSON-able dict."""
    samples = balanced_samples(split, per_type)
    configs = [(r, c) for r in recoveries for c in (caps if r == "mass" else (DCPPruneConfig().context_cap,))]
    rows = []
    for recovery, cap in configs:
        tau, source = tau_for(model, processor, key, recovery, cap, n_images, batch, split, use_table=False)
        for b in budgets:
            row = score(model, processor, samples, b, batch, tau_kappa=tau, recovery=recovery, context_cap=cap)
            row.update(config=config_name(recovery, cap), tau_source=source, split=str(split))
            rows.append(row)
            log(_line(row))
    means = {}
    for row in rows:
        means.setdefault(row["config"], []).append(row["accuracy"])
    mean_acc = {c: sum(v) / len(v) for c, v in means.items()}
    return {"kind": "sweep", "model": key, "split": str(split), "per_type": per_type, "budgets": list(budgets),
            "n_images_tau": n_images, "rows": rows, "mean_accuracy": mean_acc,
            "best": max(mean_acc, key=mean_acc.get) if mean_acc else None}  # fmt: skip


def report(model, processor, key: str, splits: tuple[Split, ...], per_type: int = 50, budgets=REPORT_BUDGETS,
           recoveries=("mass", "none"), cap: float | None = None, n_images: int = 256, batch: int = 16,
           full: bool = True, log=print) -> dict:
    """Recovery vs anchors-only on the held-out test split(s): per seed and pooled accuracy with Wilson intervals,
    the unpruned model, and pair-wise discordant counts of each recovery against "none". -> JSON-able dict."""
    for s in splits:
        if s.name != "test":
            raise SystemExit(f"the report reads the held-out test split, got {s}")
    cap = DCPPruneConfig().context_cap if cap is None else cap
    taus = {r: tau_for(model, processor, key, r, cap, n_images, batch) for r in recoveries}
    for r, (t, src) in taus.items():
        log(f"tau_kappa[{r}] = {t:.6g} ({src})")
    rows = []
    for split in splits:
        samples = balanced_samples(split, per_type)
        for b in ([None] if full else []) + list(budgets):
            for r in (["full"] if b is None else recoveries):
                if b is None:
                    row = score(model, processor, samples, None, batch)
                else:
                    tau = taus[r][0]
                    row = score(model, processor, samples, b, batch, tau_kappa=tau, recovery=r, context_cap=cap)
                    row["tau_source"] = taus[r][1]
                row.update(config=r if b is None else config_name(r, cap), recovery=r, split=str(split))
                rows.append(row)
                log(_line(row))
    return {"kind": "report", "model": key, "splits": [str(s) for s in splits], "per_type": per_type,
            "budgets": list(budgets), "context_cap": cap, "rows": rows, "pooled": pool(rows)}  # fmt: skip


def pool(rows: list[dict]) -> list[dict]:
    """Rows pooled over splits per (budget, recovery): k, n, accuracy, Wilson interval; and, against "none" at
    the same budget, the discordant pairs (this right / none wrong, and the reverse) over the same questions."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["recovery"]), []).append(r)
    out = []
    for (budget, recovery), rs in groups.items():
        k, n = sum(r["k"] for r in rs), sum(r["n"] for r in rs)
        item = {"budget": budget, "recovery": recovery, "k": k, "n": n, "accuracy": k / max(n, 1),
                "ci95": list(wilson(k, n)), "splits": [r["split"] for r in rs]}  # fmt: skip
        base = {r["split"]: r for r in groups.get((budget, "none"), [])}
        if recovery != "none" and budget is not None and base:
            wins = losses = 0
            for r in rs:
                other = base.get(r["split"])
                if other is not None:
                    wins += sum(a == "1" and b == "0" for a, b in zip(r["correct"], other["correct"], strict=True))
                    losses += sum(a == "0" and b == "1" for a, b in zip(r["correct"], other["correct"], strict=True))
            item["vs_none"] = {"this_right_none_wrong": wins, "none_right_this_wrong": losses}
        out.append(item)
    return out


def markdown(result: dict) -> str:
    """A table of pooled (report) or per-configuration (sweep) accuracies with 95 % intervals."""
    if result["kind"] == "sweep":
        budgets = result["budgets"]
        lines = ["| config | τ_κ | " + " | ".join(str(b) for b in budgets) + " | mean |",
                 "|---|---|" + "---|" * (len(budgets) + 1)]  # fmt: skip
        by = {}
        for r in result["rows"]:
            by.setdefault(r["config"], {})[r["budget"]] = r
        for config, cells in by.items():
            tau = next(iter(cells.values()))["tau_kappa"]
            acc = " | ".join(_cell(cells[b]) for b in budgets)
            lines.append(f"| {config} | {tau:.3g} | {acc} | {result['mean_accuracy'][config]:.3f} |")
        return "\n".join(lines)
    pooled = {(p["budget"], p["recovery"]): p for p in result["pooled"]}
    recoveries = sorted({p["recovery"] for p in result["pooled"] if p["budget"] is not None}, key=_order)
    lines = ["| tokens | " + " | ".join(recoveries) + " | vs none (+/−) |", "|---|" + "---|" * (len(recoveries) + 1)]
    full = pooled.get((None, "full"))
    if full:
        lines.append(f"| 576 (full) | {_cell(full)} |" + " |" * len(recoveries))
    for b in result["budgets"]:
        cells = " | ".join(_cell(pooled[(b, r)]) if (b, r) in pooled else "" for r in recoveries)
        vs = [f"{r}: +{p['vs_none']['this_right_none_wrong']}/−{p['vs_none']['none_right_this_wrong']}"
              for r in recoveries if "vs_none" in (p := pooled.get((b, r), {}))]  # fmt: skip
        lines.append(f"| {b} | {cells} | {'; '.join(vs)} |")
    return "\n".join(lines)


def _order(recovery: str) -> int:
    return {"mass": 0, "uniform": 1, "none": 2}.get(recovery, 3)


def _cell(row: dict) -> str:
    lo, hi = row["ci95"]
    return f"{row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def _line(row: dict) -> str:
    tatcs = "" if row.get("tatcs_share") is None else f"  TATCS {row['tatcs_share']:.2f}"
    tau = "" if "tau_kappa" not in row else f"  τ {row['tau_kappa']:.3g}"
    return (f"{row['split']:>16} {row['config']:>14} {str(row['budget'] or 576):>4}: {_cell(row)} "
            f"(n={row['n']}){tau}{tatcs}  {row['seconds']:.1f}s")  # fmt: skip


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x for x in text.split(",") if x)
    bad = [x for x in names if x not in SWEEP_RECOVERIES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown recovery {bad[0]!r} (accepted: {', '.join(SWEEP_RECOVERIES)})")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcp_sweep_v3.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL, help="builtin:NAME, a directory, fresh:v3 or fresh:tiny")
    common.add_argument("--n-images", type=int, default=256, help="calibration-split scenes per τ_κ calibration")
    common.add_argument("--batch", type=int, default=16)
    common.add_argument("--threads", type=int, default=1)
    common.add_argument("--out", default=OUT, help="folder for the JSON and markdown results")
    c = sub.add_parser("calibrate", parents=[common], help="τ_κ of one configuration on the calibration split")
    c.add_argument("--recovery", default="mass", choices=SWEEP_RECOVERIES)
    c.add_argument("--context-cap", type=float, default=DCPPruneConfig().context_cap)
    c.add_argument("--split", default="calibration", help="calibration[:SEED] (the test split is refused)")
    c.add_argument("--key", default=None, help=f"table key (default {BUILTIN_V3_KEY})")
    c.add_argument("--write", action="store_true", help="write the entry into the shipped vtprune/assets table")
    c.add_argument("--table", default=None, help="write the entry into this JSON table instead")
    s = sub.add_parser("sweep", parents=[common], help="λ_ctx × recovery on the calibration split")
    s.add_argument("--per-type", type=int, default=SWEEP_PER_TYPE)
    s.add_argument("--budgets", type=_ints, default=SWEEP_BUDGETS)
    s.add_argument("--caps", type=_floats, default=SWEEP_CAPS)
    s.add_argument("--recoveries", type=_names, default=SWEEP_DEFAULT_RECOVERIES)
    s.add_argument("--split", default=SWEEP_SPLIT, help="calibration[:SEED] (the test split is refused)")
    r = sub.add_parser("report", parents=[common], help="recovery vs anchors-only on the held-out test split")
    r.add_argument("--per-type", type=int, default=50)
    r.add_argument("--budgets", type=_ints, default=REPORT_BUDGETS)
    r.add_argument("--recoveries", type=_names, default=("mass", "none"))
    r.add_argument("--context-cap", type=float, default=None)
    r.add_argument("--seeds", type=_ints, default=None, help="test seeds (default: the three held-out seeds)")
    r.add_argument("--no-full", action="store_true", help="skip the unpruned row")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, processor, key = load_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "calibrate":
        split = parse_split(args.split)
        key = args.key or (BUILTIN_V3_KEY if args.model == DEFAULT_MODEL else key)
        tau = calibrate_builtin(split, model=model, processor=processor, n_images=args.n_images,
                                batch_size=args.batch, recovery=args.recovery, context_cap=args.context_cap)
        meta = {"n_images": args.n_images, "budget_ratio": round(1 / 9, 6), "percentile": 90,
                "images": f"v3 {split.name} split (seed {split.seed}) scenes 0..{args.n_images - 1}",
                "prompt": BUILTIN_PROMPT, "recovery": args.recovery, "context_cap": args.context_cap}  # fmt: skip
        print(f"tau_kappa = {tau:.6g} for {key!r} ({config_name(args.recovery, args.context_cap)}, {split})")
        if args.table:
            print(f"written to {write_tau(key, tau, args.table, **meta)}")
        elif args.write:
            print(f"written to {write_shipped_tau(key, tau, **meta)}")
        result = {"kind": "calibrate", "model": key, "tau_kappa": tau, **meta}
    elif args.command == "sweep":
        result = sweep(model, processor, key, parse_split(args.split), args.per_type, args.budgets, args.caps,
                       args.recoveries, args.n_images, args.batch)  # fmt: skip
    else:
        seeds = args.seeds
        splits = heldout_splits() if seeds is None else tuple(Split("test", s) for s in seeds)
        result = report(model, processor, key, splits, args.per_type, args.budgets, args.recoveries,
                        args.context_cap, args.n_images, args.batch, full=not args.no_full)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / f"{args.command}.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.command != "calibrate":
        table = markdown(result)
        (out / f"{args.command}.md").write_text(table + "\n")
        print(table)
    print(f"{args.command}: {result['seconds']:.0f} s; results in {out}/")
    return 0
