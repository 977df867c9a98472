"""JSONL + PNG export of a balanced question set (for other tools, RCP training, lmms-eval)."""

from __future__ import annotations

import json
from pathlib import Path

from .data import HELDOUT_SEED, balanced_samples


def export_jsonl(out: str | Path, seed: int = HELDOUT_SEED, n_per_type: int = 100,
                 name: str = "questions.jsonl") -> Path:
    """Write `out/images/*.png` and `out/<name>`; one line per question:
    {"id", "image" (path relative to the JSONL), "question", "answer", "type"}.
    A `scenes.jsonl` beside it holds the scene graphs (ground truth)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = balanced_samples(seed, n_per_type, id_prefix="shapes")
    written: dict[int, str] = {}
    path = out / name
    with open(path, "w") as f, open(out / "scenes.jsonl", "w") as g:
        for s in samples:
            key = id(s["image"])
            if key not in written:
                rel = f"images/{s['id'].rsplit('-', 1)[0]}.png"
                s["image"].save(out / rel)
                written[key] = rel
                g.write(json.dumps({"image": rel, **s["scene"].to_dict()}) + "\n")
            f.write(json.dumps({"id": s["id"], "image": written[key], "question": s["question"],
                                "answer": s["answer"], "type": s["type"]}) + "\n")
    return path


def read_jsonl(path: str | Path) -> tuple[list[dict], Path]:
    """Samples from an exported JSONL and the directory their image paths are relative to."""
    path = Path(path)
    with open(path) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    return samples, path.parent
