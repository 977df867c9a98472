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
            command: str = "", notes: str = "") -> dict:
    """Copy `run_dir/model` into `vtprune/assets/NAME`, score it on a fresh held-out set, write the card."""
    run_dir = Path(run_dir)
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


def render_stage_c(c: dict | None) -> str:
    """One paragraph on Stage C ([CLS] attention), or a note that the run skipped it."""
    if c is None:
        return "Stage C ([CLS] attention) was not run: the [CLS] embedding is untrained."
    b, a = c["before"], c["after"]
    return (f"Stage C (the [CLS] embedding alone, {c['steps']} steps, lr {c['lr']}, {c['wall_s']:.0f} s; "
            "training-only target: feature-layer [CLS] attention mass on the object and digit patches). On the "
            f"eval-set scenes: attention mass on those patches {b['mass']:.3f} → {a['mass']:.3f}, share of them "
            f"among the top-ranked patches {b['precision']:.2f} → {a['precision']:.2f}, found in the top 64 "
            f"{b['recall_at_64']:.2f} → {a['recall_at_64']:.2f}; patch features changed by "
            f"{a['feature_drift'] * 100:.2f} % (mean relative L2). The held-out table above is after Stage C.")


def render_card(card: dict) -> str:
    """Markdown model card."""
    h, tr = card["heldout"], card["training"]
    base = h["majority_baseline"]
    rows = "\n".join(f"| {t} | {h['per_type'][t]:.3f} | {base[t]:.3f} |" for t in h["per_type"])
    curve = "\n".join(f"| {c['step']} | {c['wall']:.0f} | {c['accuracy']:.3f} | "
                      + " ".join(f"{k} {v:.2f}" for k, v in c["per_type"].items()) + " |"
                      for c in tr["curve"])
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

## Held-out accuracy (seed {h['seed']}, {h['n_per_type']} questions per type, balanced answers)

Overall: **{h['accuracy']:.3f}**. Scoring: {h['scoring']}.

| type | accuracy | majority-class baseline |
|---|---|---|
{rows}

## Training

- Command: `{tr['command']}`
- Seed: {tr['seed']}; data version: {card['data_version']}
- Wall time (training steps, excluding evaluation): {tr['wall_time_s']:.0f} s on {tr['machine']}
- Seconds per step: {tr['seconds_per_step']}
- Stage A (vision tower alone, dense per-patch colour/shape/digit/xy targets through a training-only
  linear head on the penultimate layer; the head is not shipped): {stage_a}
- Stage B (frozen tower, projector + decoder on packed multi-question conversations); eval-set curve
  (eval set seed {tr['config']['eval_seed']}, {tr['config']['eval_per_type']} per type):

| step | train s | overall | per type |
|---|---|---|---|
{curve}

Best Stage-B checkpoint (by worst type, then overall) is the one shipped: step {tr['best_eval']['step']}.

{render_stage_c(tr.get('stage_c'))}

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
    a = ap.parse_args()
    c = install(a.run_dir, a.name, a.per_type, command=a.command, notes=a.notes)
    print(json.dumps(c["heldout"], indent=2))
