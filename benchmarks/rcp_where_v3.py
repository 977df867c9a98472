"""Where a trained RCP checkpoint gains or loses against its untrained start on the built-in benchmark v3
(thirty-second session): ablations of one `rcp_card_v3.py` seed directory, scored on the same held-out questions as
its card, with the tokens each pruner keeps per question type.

    python benchmarks/rcp_where_v3.py runs/rcp-v3-192/seed-42 --out runs/rcp-where/192
    python benchmarks/rcp_where_v3.py runs/rcp900f/seed-43 --out runs/rcp-where/64-s43 --rows trained,no_token_mlp

SEED_DIR is what `rcp_card_v3.py` wrote for one training seed: `rcp/` (the trained checkpoint, with its training
data still where it was written), `untrained/` (its untrained ablation with its own δ). Rows, all at the checkpoint's
budget (`--budget` is read from it), 50 questions per type and test seed (the card's):
1. `trained`, 2. `untrained`: the two checkpoints as they are (the card's `rcp` and `rcp_untrained` rows);
3. `trained_open_last`, 4. `untrained_open_last`: the last pruner opened (`ablations.pruners_opened`: it keeps
   every token that reaches it), δ unchanged; n̄ rises;
5. `trained_first_only`, 6. `untrained_first_only`: every pruner but the first opened;
7. `no_token_mlp`: trained, the token MLP's term off (S_t = 0), δ recalibrated to the budget on the checkpoint's own
   calibration hold-out (`ablations.score_term_off`);
8. `no_attention_queries`: trained, the learned queries' term off (S_a = 0), δ recalibrated likewise.
Each row: accuracy with its Wilson 95 % interval, n̄, per-type accuracy, the mean visual tokens after each pruner
per type, and two-sided exact McNemar tests against rows 1 and 2. Rows are cached in OUT/rows/ (re-running
continues); OUT/where.json and OUT/where.md hold the result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROWS = (
    "trained",
    "untrained",
    "trained_open_last",
    "untrained_open_last",
    "trained_first_only",
    "untrained_first_only",
    "no_token_mlp",
    "no_attention_queries",
)


def card_driver():
    """benchmarks/rcp_card_v3.py as a module (its `score`, `summarize`, `_cached` and `discordant`)."""
    path = Path(__file__).resolve().with_name("rcp_card_v3.py")
    spec = importlib.util.spec_from_file_location("rcp_card_v3", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoints(seed_dir: Path, out: Path, rows: list[str], loaded, log=print) -> dict[str, Path]:
    """The checkpoint folder of every row (ablations written under OUT/checkpoints/, reused when derived from the
    same trained weights)."""
    from vtprune.rcp import ablations
    from vtprune.rcp.checkpoint import read_config

    trained, untrained = seed_dir / "rcp", seed_dir / "untrained"
    layers = list(read_config(trained)["pruning_layers"])
    where = out / "checkpoints"
    found: dict[str, Path] = {"trained": trained, "untrained": untrained}
    routes = None
    for name in rows:
        if name in found:
            continue
        base = untrained if name.startswith("untrained") else trained
        folder = where / name
        if name.endswith(("_open_last", "_first_only")):
            opened = layers[-1:] if name.endswith("_open_last") else layers[1:]
            if not ablations.derived_from(folder, base, ablations.opened_kind(opened)):
                ablations.pruners_opened(base, folder, opened)
        else:
            term = name.removeprefix("no_")
            if not ablations.derived_from(folder, base, f"{term}_off"):
                routes = routes if routes is not None else ablations.calibration_routes(loaded, read_config(trained))
                _, record = ablations.score_term_off(base, folder, term, loaded.model, routes, log=log)
                log(f"{name}: δ {record['delta']:.4f} (kept {record['kept']:.2f} for {record['target']:.2f})")
        found[name] = folder
    return found


def kept_by_type(records: list[dict]) -> dict[str, list[float]]:
    """Mean visual tokens after each pruner (`kept_at`), per question type."""
    out: dict[str, list[float]] = {}
    for t in sorted({r["type"] for r in records}):
        rs = [r["kept_at"] for r in records if r["type"] == t]
        out[t] = [round(sum(col) / len(rs), 1) for col in zip(*rs, strict=True)]
    return out


def paired(rows: dict[str, dict], answers: dict[str, str], drv) -> None:
    """Each row against `trained` and `untrained` on the same questions (`rcp_card_v3.discordant`): right only here /
    only there, exact McNemar p, as `vs_trained` / `vs_untrained`, in place."""
    for ref in ("trained", "untrained"):
        if ref not in rows:
            continue
        for row in rows.values():
            here, there, p = drv.discordant(row, rows[ref], answers)
            row[f"vs_{ref}"] = {"right_only_here": here, "right_only_there": there, "p": p}


def render(result: dict) -> str:
    """Markdown: one table of the rows, one of per-type accuracy and kept tokens."""
    layers = result["pruning_layers"]
    types = sorted(next(iter(result["rows"].values()))["per_type"])
    head = (
        f"RCP ablations, `{result['seed_dir']}` (budget {result['budget']}, pruners at layers {layers}), held-out "
        f"test seeds {result['seeds']}, {result['n']} questions; accuracy with Wilson 95 % interval.\n\n"
    )
    lines = [
        "| row | accuracy [95 % CI] | n̄ | vs trained: right only here / only there (p) | vs untrained (p) |",
        "|---|---|---|---|---|",
    ]

    def vs(row: dict, ref: str) -> str:
        v = row.get(f"vs_{ref}")
        return f"{v['right_only_here']} / {v['right_only_there']} (p = {v['p']:.2g})" if v else ""

    for name, row in result["rows"].items():
        lo, hi = row["wilson95"]
        lines.append(
            f"| {name} | {row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {row['n_bar']:.1f} | {vs(row, 'trained')} | "
            f"{vs(row, 'untrained')} |"
        )
    lines += ["", f"Per type: accuracy (visual tokens after the pruners at layers {layers})", ""]
    lines.append("| row | " + " | ".join(types) + " |")
    lines.append("|---|" + "---|" * len(types))
    for name, row in result["rows"].items():
        cells = [
            f"{row['per_type'][t]['accuracy']:.3f} ({' / '.join(f'{k:g}' for k in row['kept_by_type'][t])})"
            for t in types
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def run(args: argparse.Namespace, log=print) -> dict:
    from vtprune.rcp.checkpoint import read_config
    from vtprune.runner import load
    from vtprune.testbed.data_v3 import balanced_samples
    from vtprune.testbed.splits import heldout_splits

    torch.set_num_threads(args.threads)
    drv = card_driver()
    seed_dir, out = Path(args.seed_dir), Path(args.out)
    cfg = read_config(seed_dir / "rcp")
    budget, layers = int(cfg["budget"]), list(cfg["pruning_layers"])
    loaded = load(args.model, device=args.device)
    folders = checkpoints(seed_dir, out, args.rows, loaded, log=log)
    splits = heldout_splits()
    seeds = [s.seed for s in splits]
    samples = [x for s in splits for x in balanced_samples(s, args.test_per_type)]
    rows: dict[str, dict] = {}
    for name in args.rows:
        key = {
            "row": name,
            "budget": budget,
            "test_per_type": args.test_per_type,
            "seeds": seeds,
            "model": args.model,
            "weights": read_config(folders[name]).get("weights_sha256"),
        }
        t = time.time()

        def make(folder=folders[name]) -> dict:
            res = drv.score(loaded.model, loaded.processor, samples, "rcp", budget, {"checkpoint": str(folder)},
                            layers=layers)  # fmt: skip
            return {**drv.summarize(res, seeds), "kept_by_type": kept_by_type(res["records"])}

        rows[name] = drv._cached(out / "rows" / f"{name}.json", key, make)
        r = rows[name]
        log(f"{name}: {r['accuracy']:.4f} {r['wilson95']} n̄ {r['n_bar']} ({time.time() - t:.0f} s)")
    paired(rows, {x["id"]: x["answer"] for x in samples}, drv)
    result = {
        "seed_dir": str(seed_dir),
        "model": args.model,
        "budget": budget,
        "pruning_layers": layers,
        "seeds": seeds,
        "n": len(samples),
        "rows": rows,
    }
    (out / "where.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "where.md").write_text(render(result))
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed_dir", help="a seed directory of rcp_card_v3.py (holds rcp/ and untrained/)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--model", default="builtin:shapes-v3-llava", help="the model the checkpoint was trained on")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows ({','.join(ROWS)})")
    ap.add_argument("--test-per-type", type=int, default=50, help="test questions per type and test seed (50)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        raise SystemExit(f"unknown rows {bad} (accepted: {', '.join(ROWS)})")
    for need in ("rcp", "untrained"):
        if not (Path(args.seed_dir) / need).is_dir():
            raise SystemExit(f"{args.seed_dir} has no {need}/ folder: give a seed directory of rcp_card_v3.py")
    return args


def main(argv: list[str] | None = None) -> int:
    result = run(parse(argv))
    print(render(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
