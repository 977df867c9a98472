"""RCP card on the built-in benchmark v3 (issue 22): train RCP at K = `--budget` (64) on the calibration split, then
score seven rows on the held-out test split (three test seeds, Wilson 95 % intervals), JSON + markdown.

    python benchmarks/rcp_card_v3.py --model builtin:shapes-v3-llava --seed 42 --out runs/rcp-v3   # one training seed
    python benchmarks/rcp_card_v3.py --combine runs/rcp-v3                 # the seeds' cards -> one table
    python benchmarks/rcp_card_v3.py --model DIR --seed 0 --out /tmp/rcp --smoke   # end to end, tiny counts

Re-running the same command continues: training resumes from OUT/seed-S/rcp/state, rows already scored are read
back from OUT/seed-S/rows/ (rows that do not depend on the training seed from OUT/rows/).

Rows, all at the same layer-averaged budget (n̄ = K of 576 visual tokens; 64, 32, 128 and 192 are shipped):
1. `full`: the model without pruning;
2. `rcp`: the trained checkpoint with its calibrated δ;
3. `rcp_delta0`: the trained checkpoint at δ = 0, i.e. the budget training itself reached (n̄ shows it);
4. `rcp_adapter_off`: the trained pruners with every repair adapter off (a = 0), same δ;
5. `rcp_untrained`: the run's initial plug-ins with their own δ calibrated to the same n̄ on the same calibration
   samples (`vtprune.rcp.ablations`);
6. `resprune`, 7. `divprune`: pre-LLM baselines at 64 retained tokens (n̄ = 64).
The issue lists six rows; row 3 is the seventh (our choice): it shows whether the budget came from training or
from the post-hoc offset.

Training data: `vtprune.rcp.testbed_data.calibration_jsonl` (the calibration split only; the test split raises
SplitError). The trainer holds out `--calib-n` of those questions for δ. Default recipe (thirtieth session,
docs/methods.md "RCP on the built-in benchmark"): 900 steps of 4 samples on 3,603 questions, about one pass over
fresh questions as in the source recipe (it was 300 steps on 1,230 until then). Test questions:
`data_v3.balanced_samples` of the three test seeds (`splits.heldout_splits`), `--test-per-type` per question type
and seed, scored as the model card scores them (argmax of the first answer token over the v3 answer words).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from vtprune.rcp.card_rows import LABELS, ROWS

SHARED_ROWS = ("full", "resprune", "divprune")  # independent of the training seed: scored once per OUT
SMOKE = dict(steps=2, batch=1, grad_accum=1, train_per_type=2, test_per_type=1, calib_n=2, calib_inner=0.05)


# --- scoring --------------------------------------------------------------------------------------------------
def score(
    model,
    processor,
    samples: list[dict],
    method: str,
    budget: int,
    options: dict | None = None,
    batch_size: int = 16,
    layers: list[int] | None = None,
) -> dict:
    """Accuracy of `method` at a layer-averaged `budget` on v3 `samples` (answers restricted to the v3 answer words),
    with per-sample token counts from `vtprune.last_run` (and, for `layers`, each record's visual tokens entering
    those decoder layers as `kept_at`).  -> {accuracy, per_type, n, records, n_bar, retained}."""
    import vtprune
    from vtprune.testbed.evaluate import evaluate
    from vtprune.testbed.questions_v3 import answer_vocabulary

    def on_batch(records: list[dict]) -> None:
        rec = vtprune.last_run(model)
        for r, s in zip(records, rec.samples, strict=True):
            r.update(retained=s.retained_tokens, n_bar=s.layer_avg_tokens)
            if layers:
                r["kept_at"] = [s.visual_per_layer[i] for i in layers]

    vtprune.apply(model, method, budget, budget_mode="layer_avg", **(options or {}))
    try:
        res = evaluate(model, processor, samples, batch_size=batch_size, answers=answer_vocabulary(), on_batch=on_batch)
    finally:
        vtprune.remove(model)
    recs = res["records"]
    n = max(len(recs), 1)
    res["n_bar"] = sum(r["n_bar"] for r in recs) / n
    res["retained"] = sum(r["retained"] for r in recs) / n
    return res


def summarize(res: dict, seeds: list[int]) -> dict:
    """Pooled accuracy with its Wilson 95 % interval, per test seed and per type (intervals too)."""
    from vtprune.stats import wilson

    recs = res["records"]

    def block(rows: list[dict]) -> dict:
        k = sum(bool(r["correct"]) for r in rows)
        lo, hi = wilson(k, len(rows))
        return {"accuracy": k / max(len(rows), 1), "n": len(rows), "wilson95": [round(lo, 4), round(hi, 4)]}

    return {
        **block(recs),
        "n_bar": round(res["n_bar"], 2),
        "retained": round(res["retained"], 2),
        "per_seed": {str(s): block([r for r in recs if r["id"].startswith(f"v3-test-{s}-")]) for s in seeds},
        "per_type": {t: block([r for r in recs if r["type"] == t]) for t in sorted({r["type"] for r in recs})},
        "predictions": {r["id"]: r["prediction"] for r in recs},
    }


# --- one training seed ----------------------------------------------------------------------------------------
def train_config(args: argparse.Namespace):
    from vtprune.rcp.train import RCPTrainConfig

    return RCPTrainConfig(
        budget=args.budget,
        steps=args.steps,
        batch=args.batch,
        grad_accum=args.grad_accum,
        lr=args.lr,
        beta_lr=args.beta_lr,
        seed=args.seed,
        calib_n=args.calib_n,
        calib_inner=args.calib_inner,
        calib_tol=max(args.calib_inner, 0.02),
        save_every=max(1, min(100, args.steps // 5)),
        time_limit=args.time_limit,
        precision="fp32" if args.device == "cpu" else "auto",
    )


def train_seconds(walls: list[float]) -> float:
    """Training seconds from the step log's wall clock, which is cumulative within one invocation and restarts
    at every resume: a value below the one before starts a new segment, counted from 0."""
    return round(sum(b - a if b >= a else b for a, b in zip([0.0, *walls], walls, strict=False)), 1)


def seconds_per_step(walls: list[float]) -> float | None:
    """Mean seconds per logged step, over every resume (`train_seconds`)."""
    return round(train_seconds(walls) / len(walls), 3) if walls else None


def _trained(ckpt: Path, cfg) -> bool:
    """True when `ckpt` holds a finished checkpoint of exactly this training recipe."""
    from dataclasses import asdict

    from vtprune.rcp.checkpoint import read_config

    try:
        have = read_config(ckpt)
    except Exception:  # absent or unreadable: train (or resume)
        return False
    recorded = dict((have.get("training") or {}).get("config") or {})
    want = json.loads(json.dumps(asdict(cfg)))
    for key in ("time_limit", "stop_after"):  # how a run was paced does not change what it trained
        recorded.pop(key, None)
        want.pop(key, None)
    return recorded == want


def _cached(path: Path, key: dict, make) -> dict:
    """Read `path` if it was written for `key`, else compute `make()` and write it."""
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return data["row"]
    row = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "row": row}) + "\n")
    return row


def run_seed(args: argparse.Namespace, log=print) -> dict:
    """Train (or resume) one seed, build the ablations, score the rows, write OUT/seed-S/card.{json,md}."""
    from vtprune.rcp import ablations
    from vtprune.rcp.checkpoint import read_config
    from vtprune.rcp.testbed_data import calibration_jsonl
    from vtprune.rcp.train import train
    from vtprune.runner import load
    from vtprune.testbed.data_v3 import balanced_samples
    from vtprune.testbed.splits import calibration_split, heldout_splits

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    seed_dir = out / f"seed-{args.seed}"
    times: dict[str, float] = {}
    t = time.time()
    data = calibration_jsonl(calibration_split(), out / "data", args.train_per_type)
    times["data_s"] = round(time.time() - t, 1)
    loaded = load(args.model, device=args.device)
    model, processor = loaded.model, loaded.processor
    n_model = sum(p.numel() for p in model.parameters())

    ckpt = seed_dir / "rcp"
    done = _trained(ckpt, train_config(args))
    if done:
        log(f"{ckpt}: trained with this recipe already (delete it to train again)")
        summary = {"steps_done": 1, "total_steps": 1}
    else:
        summary = train(
            args.model,
            data,
            seed_dir / "rcp",
            train_config(args),
            device=args.device,
            progress=False,
            log=log,
            loaded=loaded,
        )
    if summary["steps_done"] < summary["total_steps"]:
        log(f"training stopped at step {summary['steps_done']}/{summary['total_steps']}: re-run to continue")
        return {"incomplete": True, "summary": summary}
    cfg = read_config(ckpt)

    t = time.time()
    off = seed_dir / "adapter_off"
    if not ablations.derived_from(off, ckpt, "adapter_off"):
        ablations.adapter_off(ckpt, off)
    base = seed_dir / "untrained"
    if not ablations.derived_from(base, ckpt, "untrained"):
        routes = ablations.calibration_routes(loaded, cfg)
        ablations.untrained(ckpt, base, model, routes, calib_inner=args.calib_inner, log=log)
    calib = read_config(base)["calibration"]
    times["ablations_s"] = round(time.time() - t, 1)

    splits = heldout_splits()
    seeds = [s.seed for s in splits]
    samples = [x for s in splits for x in balanced_samples(s, args.test_per_type)]
    budget = args.budget
    specs = {
        "full": ("none", 576, {}),
        "rcp": ("rcp", budget, {"checkpoint": str(ckpt)}),
        "rcp_delta0": ("rcp", budget, {"checkpoint": str(ckpt), "delta": 0.0}),
        "rcp_adapter_off": ("rcp", budget, {"checkpoint": str(off)}),
        "rcp_untrained": ("rcp", budget, {"checkpoint": str(base)}),
        "resprune": ("resprune", budget, {}),
        "divprune": ("divprune", budget, {}),
    }
    rows = {}
    t = time.time()
    for name in args.rows:
        method, b, options = specs[name]
        where = out / "rows" if name in SHARED_ROWS else seed_dir / "rows"
        key = {
            "method": method,
            "budget": b,
            "test_per_type": args.test_per_type,
            "seeds": seeds,
            "model": args.model,
            "weights": read_config(options["checkpoint"]).get("weights_sha256") if "checkpoint" in options else None,
            "options": {k: v for k, v in options.items() if k != "checkpoint"},
        }
        t_row = time.time()

        def make(m=method, b=b, o=options) -> dict:
            return summarize(score(model, processor, samples, m, b, o), seeds)

        rows[name] = _cached(where / f"{name}.json", key, make)
        log(
            f"{LABELS[name]}: {rows[name]['accuracy']:.4f} {rows[name]['wilson95']} n̄ {rows[name]['n_bar']} "
            f"({time.time() - t_row:.0f} s)"
        )
    times["scoring_s"] = round(time.time() - t, 1)
    if "rcp" in rows:
        add_paired(rows, {x["id"]: x["answer"] for x in samples})

    log_path = ckpt / "train_log.jsonl"
    walls = [json.loads(x)["wall"] for x in log_path.read_text().splitlines() if x.strip()]
    times["train_s"] = train_seconds(walls)  # every invocation's training, not only this one's
    card = {
        "model": args.model,
        "model_parameters": n_model,
        "seed": args.seed,
        "budget": budget,
        "rho": cfg["rho"],
        "checkpoint": str(ckpt),
        "plugin_parameters": (cfg.get("parameters") or {}).get("plugins"),
        "convergence": cfg.get("convergence"),
        "delta": cfg.get("delta"),
        "untrained_delta": calib["delta"],
        "recipe": {
            k: v
            for k, v in vars(train_config(args)).items()
            if k
            in (
                "steps",
                "batch",
                "grad_accum",
                "lr",
                "beta_lr",
                "beta_update",
                "repair_norm",
                "lambda_repair",
                "lambda_sparse",
                "lambda_task",
                "calib_n",
            )
        },
        "n_train": (cfg.get("training") or {}).get("n_train"),
        "n_calibration": (cfg.get("training") or {}).get("n_calibration"),
        "seconds_per_step": seconds_per_step(walls),
        "test": {"seeds": seeds, "per_type": args.test_per_type, "n": len(samples)},
        "times": times,
        "rows": {k: {kk: vv for kk, vv in v.items() if kk != "predictions"} for k, v in rows.items()},
    }
    seed_dir.mkdir(parents=True, exist_ok=True)
    (seed_dir / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (seed_dir / "card.md").write_text(render_seed(card))
    if args.install:
        install(args.model, ckpt, card)
    return card


def discordant(row: dict, ref: dict, answers: dict[str, str]) -> tuple[int, int, float]:
    """Questions of `answers` that `row` answers right and `ref` wrong, the reverse, and the two-sided exact McNemar
    p of the two rows' per-question outcomes (both rows carry `predictions` by question id)."""
    from vtprune.eval.significance import bits_of, mcnemar_exact

    ids = sorted(answers)
    mine = bits_of(row["predictions"].get(i) == answers[i] for i in ids)
    theirs = bits_of(ref["predictions"].get(i) == answers[i] for i in ids)
    here = sum(a == "1" and b == "0" for a, b in zip(mine, theirs, strict=True))
    there = sum(a == "0" and b == "1" for a, b in zip(mine, theirs, strict=True))
    return here, there, mcnemar_exact(mine, theirs)


def add_paired(rows: dict[str, dict], answers: dict[str, str]) -> None:
    """Each row against the trained RCP row on the same questions: `differs_from_rcp` (predictions that differ),
    `vs_rcp` = {"right_only_here", "right_only_rcp", "p"} (`discordant`), in place."""
    ref = rows["rcp"]
    for r in rows.values():
        r["differs_from_rcp"] = sum(r["predictions"].get(k) != v for k, v in ref["predictions"].items())
        here, there, p = discordant(r, ref, answers)
        r["vs_rcp"] = {"right_only_here": here, "right_only_rcp": there, "p": p}


# --- rendering ------------------------------------------------------------------------------------------------
def _ci(r: dict) -> str:
    lo, hi = r["wilson95"]
    return f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"


def render_seed(card: dict) -> str:
    """Markdown card of one training seed."""
    conv = card.get("convergence") or {}
    verdict = "converged" if conv.get("converged") else "**NOT CONVERGED**"
    seeds = card["test"]["seeds"]
    lines = [
        f"# RCP on `{card['model']}`, training seed {card['seed']}: {card['budget']} layer-averaged tokens",
        "",
        f"Training: {verdict} (final r̄ {conv.get('r_bar')} for ρ {card['rho']:.4f}, δ {card['delta']:.3f}; "
        f"{conv.get('criteria', '')}). Plug-ins: {card['plugin_parameters']:,} parameters next to the model's "
        f"{card['model_parameters']:,}. Recipe: {card['recipe']}; {card['n_train']} training / {card['n_calibration']} "
        f"δ-calibration questions of the calibration split; {card['seconds_per_step']} s per step.",
        "",
        f"Held-out test split, seeds {seeds}, {card['test']['per_type']} questions per type and seed "
        f"({card['test']['n']} in all); accuracy with Wilson 95 % intervals.",
        "",
        "| row | n̄ | retained | accuracy [95 % CI] | "
        + " | ".join(f"test {s}" for s in seeds)
        + " | ≠ RCP | vs RCP: right only here / only RCP (p) |",
        "|---|---|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for name, r in card["rows"].items():
        per = " | ".join(f"{r['per_seed'][str(s)]['accuracy']:.3f}" for s in seeds)
        lines.append(
            f"| {LABELS[name]} | {r['n_bar']:.1f} | {r['retained']:.1f} | {_ci(r)} | {per} | "
            f"{r.get('differs_from_rcp', '')} | {_paired(r) if name != 'rcp' else ''} |"
        )
    lines += [
        "",
        f'Untrained pruner\'s own δ: {card["untrained_delta"]:.3f}. "≠ RCP": questions whose prediction '
        'differs from the trained RCP row\'s; "vs RCP": questions only this row answers right / only the trained '
        "RCP row does, two-sided exact McNemar p.",
        "",
    ]
    return "\n".join(lines)


def _paired(r: dict) -> str:
    v = r.get("vs_rcp")
    return f"{v['right_only_here']} / {v['right_only_rcp']} (p = {v['p']:.2g})" if v else ""


def combine(out: Path) -> str:
    """One markdown table of every OUT/seed-*/card.json: rows × training seeds (accuracy [95 % CI], n̄)."""
    cards = [json.loads(p.read_text()) for p in sorted(out.glob("seed-*/card.json"))]
    if not cards:
        raise SystemExit(f"no seed-*/card.json under {out}: run the per-seed command first")
    seeds = [c["seed"] for c in cards]
    lines = [
        f"# RCP on `{cards[0]['model']}` at {cards[0]['budget']} layer-averaged tokens: {len(cards)} training seeds",
        "",
        f"Held-out test split (seeds {cards[0]['test']['seeds']}, {cards[0]['test']['n']} questions per row); every "
        "training seed is reported.",
        "",
        "| row | " + " | ".join(f"seed {s}: accuracy [95 % CI] (n̄)" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for name in ROWS:
        if not all(name in c["rows"] for c in cards):
            continue
        cells = " | ".join(
            f"{_ci(c['rows'][name])} ({c['rows'][name]['n_bar']:.1f})"
            + (f"; vs RCP {_paired(c['rows'][name])}" if name != "rcp" and "vs_rcp" in c["rows"][name] else "")
            for c in cards
        )
        lines.append(f"| {LABELS[name]} | {cells} |")
    lines += [
        "",
        "vs RCP: questions only that row answers right / only the trained RCP row of the same seed does "
        "(two-sided exact McNemar p).",
        "",
    ]
    for c in cards:
        conv = c.get("convergence") or {}
        verdict = "converged" if conv.get("converged") else "NOT CONVERGED"
        lines.append(
            f"- seed {c['seed']}: {verdict} (final r̄ {conv.get('r_bar')}, ρ {c['rho']:.4f}, δ "
            f"{c['delta']:.3f}; untrained δ {c['untrained_delta']:.3f})"
        )
    text = "\n".join(lines) + "\n"
    (out / "card.md").write_text(text)
    (out / "card.json").write_text(json.dumps({"seeds": seeds, "cards": cards}, indent=1) + "\n")
    return text


def install(model_id: str, ckpt: Path, card: dict) -> Path:
    """Copy the checkpoint into vtprune/assets/rcp/NAME (for `builtin:NAME`) with its card and this seed's table:
    into NAME/ itself when that is empty or holds a checkpoint for the same budget, else into NAME/budgets/K/
    (K: the budget in tokens; `vtprune.shipped.shipped_rcp_dirs`)."""
    from vtprune.rcp.checkpoint import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, read_config
    from vtprune.shipped import BUILTIN_PREFIX, RCP_ASSETS, RCP_BUDGETS

    if not model_id.startswith(BUILTIN_PREFIX):
        raise SystemExit(f"--install needs a builtin:NAME model, got {model_id}")
    dest = RCP_ASSETS / model_id[len(BUILTIN_PREFIX) :]
    if (dest / WEIGHTS_NAME).exists() and round(read_config(dest)["budget"]) != round(card["budget"]):
        dest = dest / RCP_BUDGETS / str(round(card["budget"]))
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt / WEIGHTS_NAME, dest / WEIGHTS_NAME)
    cfg = json.loads((ckpt / CONFIG_NAME).read_text())
    if isinstance(cfg.get("training"), dict) and "data" in cfg["training"]:  # a path on the training machine
        n = cfg["training"].get("n_train", 0) + cfg["training"].get("n_calibration", 0)
        cfg["training"]["data"] = (
            f"the v3 calibration split, {n} questions (vtprune.rcp.testbed_data.calibration_jsonl, "
            "benchmarks/rcp_card_v3.py)"
        )
    (dest / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    text = (
        (ckpt / CARD_NAME).read_text()
        + f'\nShipped: training seed {card["seed"]}; docs/methods.md ("RCP on the built-in benchmark") reports every '
        "seed trained for this model and budget; the seed to ship is fixed before any seed is scored (the first one "
        "run).\n\n" + render_seed(card)
    )
    (dest / CARD_NAME).write_text(text)
    return dest


# --- command line ---------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    from vtprune.rcp.train import RCPTrainConfig

    beta_lr = RCPTrainConfig().beta_lr
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:shapes-v3-llava", help="builtin:NAME or a v3 model directory")
    ap.add_argument("--seed", type=int, default=42, help="training seed (report every seed you run)")
    ap.add_argument("--out", default="runs/rcp-v3", help="output folder (shared by the seeds)")
    ap.add_argument("--budget", type=int, default=64, help="layer-averaged visual tokens (64)")
    ap.add_argument("--steps", type=int, default=900, help="optimiser steps (900)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3, help="plug-in learning rate (1e-3: a CPU-sized run)")
    ap.add_argument("--beta-lr", type=float, default=beta_lr, help=f"learning rate of the pruners' β ({beta_lr})")
    ap.add_argument("--train-per-type", type=int, default=529,
                    help="calibration-split questions per type (529: less --calib-n, one pass in 900 steps of 4)")
    ap.add_argument("--calib-n", type=int, default=100, help="of those, held out for δ (100)")
    ap.add_argument("--calib-inner", type=float, default=0.01, help="δ search tolerance, relative (0.01)")
    ap.add_argument("--test-per-type", type=int, default=50, help="test questions per type and test seed (50)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows ({','.join(ROWS)})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--time-limit", type=float, default=None, help="stop training (resumable) after N seconds")
    ap.add_argument("--smoke", action="store_true", help=f"tiny counts: {SMOKE}")
    ap.add_argument("--install", action="store_true", help="copy the checkpoint to vtprune/assets/rcp/NAME")
    ap.add_argument("--combine", metavar="OUT", default=None, help="only combine OUT/seed-*/card.json into one table")
    return ap


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        raise SystemExit(f"unknown rows {bad} (accepted: {', '.join(ROWS)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.combine:
        print(combine(Path(args.combine)), end="")
        return 0
    card = run_seed(args)
    if card.get("incomplete"):
        return 3
    print(render_seed(card), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
