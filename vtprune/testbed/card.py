"""Install a trained run as a built-in checkpoint and write its model card (README.md + model_card.json)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .builtin import ASSETS, resolve_model
from .data import HELDOUT_SEED, balanced_samples
from .evaluate import evaluate, majority_baseline
from .scenes import DATA_VERSION

_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
          "tokenizer.json", "tokenizer_config.json")


def install(run_dir: str | Path, name: str = "shapes-llava", per_type: int = 100, seed: int = HELDOUT_SEED,
            command: str = "", notes: str = "", lineage: list[dict] | None = None) -> dict:
    """Copy `run_dir/model` into `vtprune/assets/NAME`, score it on a fresh held-out set, write the card.

    lineage: when `run_dir` is the last of several runs (a model continued from other runs' models), one dict per
    run, first to last, with the keys of `LINEAGE_KEYS` (`check_lineage`); the card lists them and their total time.
    """
    run_dir = Path(run_dir)
    links = check_lineage(lineage) if lineage else None
    if name == "shapes-llava" and "shapes-v3" in (run_dir / "train_summary.json").read_text():
        from vtprune.errors import VtpruneError

        raise VtpruneError("a shapes-v3 run may not replace the shipped v2 model builtin:shapes-llava; "
                           "install it under another name (e.g. --name shapes-v3-llava)")
    dest = ASSETS / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in _FILES:
        shutil.copyfile(run_dir / "model" / f, dest / f)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    model, processor = resolve_model(dest)
    data_version = summary.get("data_version", DATA_VERSION)
    t0 = time.time()
    if data_version == "shapes-v3":  # the held-out test split's three seeds (splits.py), Wilson 95 % intervals
        samples, res, heldout_extra = _score_v3(model, processor, per_type)
        seed = heldout_extra["seeds"]
    else:
        samples = balanced_samples(seed, per_type, id_prefix="heldout")
        res, heldout_extra = evaluate(model, processor, samples, batch_size=16), {}
    card = {
        "name": name,
        "architecture": "LlavaForConditionalGeneration (CLIP ViT 336px/14 -> 576 tokens, layer -2, "
                        "'default' strategy; Llama decoder)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float16 (safetensors)",
        "data_version": data_version,
        "notes": notes,
        "training": {"command": command, "config": summary["config"], "seed": summary["config"]["seed"],
                     "wall_time_s": summary["train_wall_s"],
                     "machine": f"{cpu_model()}; {summary['machine']}",
                     "best_eval": summary["best"], "curve": [h for h in summary["history"]
                                                             if h["stage"] == "B-eval"],
                     "stage_a_final": next((h for h in reversed(summary["history"]) if h["stage"] == "A"),
                                           None),
                     "stage_c": next((h for h in reversed(summary["history"]) if h["stage"] == "C"), None),
                     "seconds_per_step": seconds_per_step(summary["history"])},
        "heldout": {"seed": seed, "n_per_type": per_type, "accuracy": round(res["accuracy"], 4),
                    "per_type": {k: round(v, 4) for k, v in res["per_type"].items()},
                    "majority_baseline": {k: round(v, 4) for k, v in majority_baseline(samples).items()},
                    "scoring": "argmax of the first generated token's logits over the answer vocabulary",
                    "scoring_time_s": round(time.time() - t0, 1), **heldout_extra},
    }
    if links:
        card["training"]["lineage"] = links
        card["training"]["lineage_seconds"] = round(sum(x["seconds"] for x in links))
    (dest / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (dest / "README.md").write_text(render_card(card))
    return card


def _score_v3(model, processor, per_type: int) -> tuple[list[dict], dict, dict]:
    """Score on the v3 test splits (`per_type` questions per type and seed): (samples, pooled result, extras with
    the seeds, per-seed accuracy and Wilson 95 % intervals overall and per type)."""
    from vtprune.stats import wilson

    from .data_v3 import balanced_samples
    from .questions_v3 import answer_vocabulary
    from .splits import heldout_splits

    splits = heldout_splits()
    samples = [x for split in splits for x in balanced_samples(split, per_type)]
    res = evaluate(model, processor, samples, batch_size=16, answers=answer_vocabulary())
    recs = res["records"]
    per_seed = {}
    for split in splits:  # sample ids are v3-test-SEED-...
        rows = [r for r in recs if r["id"].startswith(f"v3-{split.name}-{split.seed}-")]
        per_seed[split.seed] = round(sum(r["correct"] for r in rows) / max(1, len(rows)), 4)

    def ci(rows: list[dict]) -> list[float]:
        return [round(v, 4) for v in wilson(sum(r["correct"] for r in rows), len(rows))]

    extra = {"seeds": [s.seed for s in splits], "per_seed_accuracy": per_seed, "wilson95": ci(recs),
             "wilson95_per_type": {t: ci([r for r in recs if r["type"] == t]) for t in res["per_type"]}}
    return samples, res, extra


#: one run of a lineage: its name, what it did, its command, its steps and seconds of training, threads, machine
LINEAGE_KEYS = {"run": str, "what": str, "command": str, "steps": int, "seconds": (int, float), "threads": int,
                "machine": str}


def check_lineage(links: object) -> list[dict]:
    """`links` if it is a non-empty list of dicts with exactly `LINEAGE_KEYS` of the right types, else a one-line
    ValueError naming the first problem."""
    if not isinstance(links, list) or not links:
        raise ValueError("lineage must be a non-empty JSON list of runs, first to last")
    for i, link in enumerate(links):
        if not isinstance(link, dict) or set(link) != set(LINEAGE_KEYS):
            raise ValueError(f"lineage run {i} must have exactly the keys {', '.join(LINEAGE_KEYS)}")
        for key, kind in LINEAGE_KEYS.items():
            if isinstance(link[key], bool) or not isinstance(link[key], kind):
                raise ValueError(f"lineage run {i}: {key} must be {getattr(kind, '__name__', 'a number')}")
        if link["seconds"] < 0 or link["steps"] < 0 or link["threads"] < 1:
            raise ValueError(f"lineage run {i}: steps and seconds must be >= 0 and threads >= 1")
    return links


def render_lineage(tr: dict) -> str:
    """The lineage table of a model continued over several runs, or '' for a single run."""
    links = tr.get("lineage")
    if not links:
        return ""
    rows = "\n".join(f"| {x['run']} | {x['what']} | {x['steps']:,} | {x['seconds']:,.0f} | {x['threads']} | "
                     f"{x['machine']} | `{x['command']}` |" for x in links)
    total = tr["lineage_seconds"]
    return f"""
## Lineage: every run this model's weights went through

{len(links)} runs, {sum(x['steps'] for x in links):,} steps, {total:,} s ({total / 3600:.1f} h) of training in all
(seconds of steps, evaluations and set-up excluded). The "Training" section below is the last run's alone.

| run | what | steps | seconds | threads | machine | command |
|---|---|---|---|---|---|---|
{rows}
"""


def render_heldout(h: dict) -> str:
    """The held-out table: with Wilson 95 % intervals and per-seed accuracy when the card has them (v3)."""
    base = h["majority_baseline"]
    if "wilson95_per_type" not in h:
        rows = "\n".join(f"| {t} | {h['per_type'][t]:.3f} | {base[t]:.3f} |" for t in h["per_type"])
        return f"""Overall: **{h['accuracy']:.3f}**. Scoring: {h['scoring']}.

| type | accuracy | majority-class baseline |
|---|---|---|
{rows}"""
    ci = h["wilson95_per_type"]
    rows = "\n".join(f"| {t} | {h['per_type'][t]:.3f} ({ci[t][0]:.3f}–{ci[t][1]:.3f}) | {base[t]:.3f} |"
                     for t in h["per_type"])
    seeds = ", ".join(f"{s}: {a:.3f}" for s, a in h["per_seed_accuracy"].items())
    lo, hi = h["wilson95"]
    return f"""Overall: **{h['accuracy']:.3f}** (Wilson 95 % interval {lo:.3f}–{hi:.3f}); per test seed {seeds}.
Scoring: {h['scoring']}.

| type | accuracy (Wilson 95 %) | majority-class baseline |
|---|---|---|
{rows}"""


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else ''."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def seconds_per_step(history: list[dict]) -> dict[str, float]:
    """Mean training seconds per step of each stage, from the logged wall clock (evaluation excluded)."""
    out = {}
    for stage in ("A", "B"):
        pts = [(h["step"], h["wall"]) for h in history if h["stage"] == stage]
        if len(pts) >= 2:
            (s0, w0), (s1, w1) = pts[0], pts[-1]
            out[stage] = round((w1 - w0) / max(1, s1 - s0), 3)
    return out


def render_stage_c(c: dict | None, lineage: list[dict] | None = None) -> str:
    """One paragraph on Stage C ([CLS] attention), or a note that the run skipped it, saying whether an earlier run
    of the lineage tuned the [CLS] embedding (its entry names "the [CLS] embedding alone")."""
    if c is None:
        if any("[CLS] embedding alone" in x["what"] for x in lineage or []):
            return ("Stage C ([CLS] attention) was not run in this run: an earlier run in the lineage above tuned the "
                    "[CLS] embedding, and this run kept it.")
        return "Stage C ([CLS] attention) was not run: the [CLS] embedding is untrained."
    b, a = c["before"], c["after"]
    return (f"Stage C (the [CLS] embedding alone, {c['steps']} steps, lr {c['lr']}, {c['wall_s']:.0f} s; "
            "training-only target: feature-layer [CLS] attention mass on the object and digit patches). On the "
            f"eval-set scenes: attention mass on those patches {b['mass']:.3f} → {a['mass']:.3f}, share of them "
            f"among the top-ranked patches {b['precision']:.2f} → {a['precision']:.2f}, found in the top 64 "
            f"{b['recall_at_64']:.2f} → {a['recall_at_64']:.2f}; patch features changed by "
            f"{a['feature_drift'] * 100:.2f} % (mean relative L2). The held-out table above is after Stage C.")


def render_stage_b(tr: dict) -> str:
    """Stage B's eval-set curve and the shipped checkpoint, or a line saying this run had no Stage-B steps."""
    cfg = tr["config"]
    if not tr["curve"] or tr["best_eval"] is None:
        return ("- Stage B: no steps in this run (its model is the previous run's, e.g. grown or with Stage C only; "
                "a lineage above lists the runs that trained it).")
    curve = "\n".join(f"| {c['step']} | {c['wall']:.0f} | {c['accuracy']:.3f} | "
                      + " ".join(f"{k} {v:.2f}" for k, v in c["per_type"].items()) + " |"
                      for c in tr["curve"])
    what = ("projector, decoder and vision tower" if cfg.get("tower_lr_b", 0) > 0
            else "frozen tower, projector + decoder")
    return f"""- Stage B ({what} on packed multi-question conversations); eval-set curve
  (eval set seed {cfg['eval_seed']}, {cfg['eval_per_type']} per type):

| step | train s | overall | per type |
|---|---|---|---|
{curve}

Best Stage-B checkpoint (by worst type, then overall) is the one shipped: step {tr['best_eval']['step']}."""


def _seeds(seed: int | list[int]) -> str:
    """'seed S' (v2: one held-out seed) or 'test seeds A / B / C' (v3: the test split's seeds)."""
    return " / ".join(str(x) for x in seed).join(("test seeds ", "")) if isinstance(seed, list) else f"seed {seed}"


def render_card(card: dict) -> str:
    """Markdown model card."""
    h, tr = card["heldout"], card["training"]
    cfg = json.dumps(tr["config"], indent=2)
    stage_a = (f"last log {tr['stage_a_final']}" if tr["stage_a_final"] is not None
               else "not run in this run (the tower comes from `init` / `vision_init`)")
    return f"""# {card['name']} — vtprune built-in testbed model

A tiny vision-language model with the geometry of LLaVA-1.5 (336-px CLIP tower, patch 14, 576 visual
tokens from ViT layer -2 with [CLS] dropped, 2-layer GELU projector, Llama decoder), trained offline on
the procedural `{card['data_version']}` scenes of `vtprune.testbed`. It exists so that token-pruning
methods can be run and compared without downloading anything. It is **not** a general VLM.

- Class: `{card['architecture']}`
- Parameters: {card['parameters']:,} ({card['dtype']})
- Load: `vtprune.testbed.load_builtin("{card['name']}")` or `resolve_model("builtin:{card['name']}")`
- Prompt: `USER: <image>\\n{{question}} ASSISTANT:` → one answer word, then `</s>`

{card.get('notes') or ''}

## Held-out accuracy ({_seeds(h['seed'])}, {h['n_per_type']} questions per type, balanced answers)

{render_heldout(h)}
{render_lineage(tr)}
## Training

- Command: `{tr['command']}`
- Seed: {tr['seed']}; data version: {card['data_version']}
- Wall time (training steps, excluding evaluation): {tr['wall_time_s']:.0f} s on {tr['machine']}
- Seconds per step: {tr['seconds_per_step']}
- Stage A (vision tower alone, dense per-patch colour/shape/digit/xy targets through a training-only
  linear head on the penultimate layer; the head is not shipped): {stage_a}
{render_stage_b(tr)}

{render_stage_c(tr.get('stage_c'), tr.get('lineage'))}

<details><summary>Training config</summary>

```json
{cfg}
```
</details>
"""


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--name", default="shapes-llava")
    ap.add_argument("--per-type", type=int, default=100)
    ap.add_argument("--command", default="")
    ap.add_argument("--notes", default="", help="free text (markdown) for the card")
    ap.add_argument("--lineage", default="", help="JSON file: the runs this model was continued through, first to "
                                                  f"last, each with the keys {', '.join(LINEAGE_KEYS)}")
    a = ap.parse_args()
    try:
        links = check_lineage(json.loads(Path(a.lineage).read_text())) if a.lineage else None
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise SystemExit(f"--lineage {a.lineage}: {e}") from None
    c = install(a.run_dir, a.name, a.per_type, command=a.command, notes=a.notes, lineage=links)
    print(json.dumps(c["heldout"], indent=2))
