"""RCP training data from the built-in benchmark v3: the *calibration* split only (issue 22, spec README splits).

    from vtprune.testbed.splits import calibration_split
    path = calibration_jsonl(calibration_split(), "runs/rcp-data", n_per_type=300)   # -> runs/rcp-data/questions.jsonl

The v3 splits (`vtprune.testbed.splits`) say what each stream is for: the built-in model learned from the train
split, the held-out test split is for reporting only, and the calibration split is "the only data any default
may be tuned or calibrated on (…, RCP training, …)". `calibration_jsonl` is a calibration routine
(`@calibration_routine` + `require_calibration`): the test split raises `SplitError`, and so does the train
split (the backbone already saw it). The rows are balanced per question type (`data_v3.balanced_samples`) and
written as the trainer's JSONL (`rcp.data`: id, image, question, answer, type, split) with one PNG per scene.

This module belongs to the application side (the trainer and `benchmarks/rcp_card_v3.py` use it); the method
file `vtprune/methods/rcp.py` never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..testbed.splits import Split, SplitError, calibration_routine, require_calibration


@calibration_routine
def calibration_examples(split: Split, n_per_type: int) -> list[dict]:
    """Balanced questions of a calibration split (`data_v3.balanced_samples`; dicts id / image (PIL) / question /
    answer / type / scene / split).  The test and train splits raise `SplitError`."""
    require_calibration(split, "RCP training data")
    if split.name != "calibration":
        raise SplitError(
            f"RCP training data comes from the calibration split only, got {split} (the built-in model learned from "
            "the train split); use vtprune.testbed.splits.calibration_split()"
        )
    if isinstance(n_per_type, bool) or not isinstance(n_per_type, int) or n_per_type < 1:
        raise ValueError(f"n_per_type must be an int >= 1, got {n_per_type!r}")
    from ..testbed.data_v3 import balanced_samples

    return balanced_samples(split, n_per_type)


@calibration_routine
def calibration_jsonl(split: Split, out: str | Path, n_per_type: int, name: str = "questions.jsonl") -> Path:
    """Write `out/images/*.png` (one per scene) and `out/<name>` (one row per question: id, image relative to the
    JSONL, question, answer, type, split) from `calibration_examples(split, n_per_type)`.  An existing file with
    the same split and count is reused as is (`out/manifest.json` records them).  -> the JSONL's path."""
    out = Path(out)
    path = out / name
    manifest = out / "manifest.json"
    want = {"split": str(split), "n_per_type": n_per_type, "format": "vtprune-rcp-testbed/1"}
    if path.exists() and manifest.exists():
        try:
            if json.loads(manifest.read_text()) == want:
                return path
        except ValueError:
            pass
    samples = calibration_examples(split, n_per_type)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written: dict[int, str] = {}
    tmp = out / f".{name}.tmp"
    with open(tmp, "w") as f:
        for s in samples:
            key = id(s["image"])  # the questions of one scene share its image object
            if key not in written:
                rel = f"images/{s['id'].rsplit('-', 1)[0]}.png"
                s["image"].save(out / rel)
                written[key] = rel
            row = {k: s[k] for k in ("id", "question", "answer", "type", "split")}
            f.write(json.dumps({**row, "image": written[key]}) + "\n")
    tmp.replace(path)
    manifest.write_text(json.dumps(want) + "\n")
    return path
