"""Score a (possibly pruned) LLaVA-style model on testbed questions.

The model is used as a plain HF model: `model.generate(..., max_new_tokens=1)` on left-padded
batches built by the processor, so a caller may install pruning (e.g. `vtprune.apply(model, ...)`)
before calling `evaluate`. The prediction is the argmax of the first generated token's logits
restricted to the answer vocabulary (all answer words of all types), unless `restrict=False`,
in which case it is the plain greedy token.

Pruned evaluation with token counts, FLOPs and prefill time: `vtprune.eval.run_eval`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from PIL import Image

from .questions import answer_vocabulary
from .tokenizer import prompt


def _load_image(image: Image.Image | str | Path, root: Path | None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    path = Path(image)
    if root is not None and not path.is_absolute():
        path = root / path
    return Image.open(path).convert("RGB")


@torch.no_grad()
def evaluate(model, processor, samples: Iterable[dict], batch_size: int = 16, restrict: bool = True,
             image_root: str | Path | None = None, progress: bool = False,
             on_batch: Callable[[list[dict]], None] | None = None, answers: Iterable[str] | None = None) -> dict:
    """Accuracy overall and per type, plus per-sample records.

    samples: dicts with id, image (PIL image or path, relative to `image_root`), question, answer, type.
    Returns {"accuracy", "per_type": {type: acc}, "n", "n_per_type", "records": [{id, type, answer,
    prediction, correct}]}. `on_batch(records)` is called after each batch's generate. `answers`: the answer
    words `restrict` chooses among (default the v2 benchmark's; `questions_v3.answer_vocabulary()` for v3).
    """
    samples = list(samples)
    root = Path(image_root) if image_root is not None else None
    tok = processor.tokenizer
    answer_ids = torch.tensor(tok.convert_tokens_to_ids(list(answers or answer_vocabulary())))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    records: list[dict] = []
    batches = range(0, len(samples), batch_size)
    if progress:
        from vtprune.progress import track  # plain periodic lines when not in a terminal

        batches = track(batches, description="scoring")
    for start in batches:
        chunk = samples[start: start + batch_size]
        images = [_load_image(s["image"], root) for s in chunk]
        texts = [prompt(s["question"]) for s in chunk]
        inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        logits = out.logits[0].float().cpu()  # [B, V]: logits of the first generated token
        if restrict:
            pred_ids = answer_ids[logits[:, answer_ids].argmax(-1)]
        else:
            pred_ids = logits.argmax(-1)
        preds = tok.convert_ids_to_tokens(pred_ids.tolist())
        batch_records = [{"id": s["id"], "type": s["type"], "answer": s["answer"], "prediction": p,
                          "correct": p == s["answer"]} for s, p in zip(chunk, preds, strict=True)]
        if on_batch is not None:  # e.g. read vtprune.last_run(model) for this batch
            on_batch(batch_records)
        records.extend(batch_records)
    if was_training:
        model.train()
    return summarize(records)


def summarize(records: list[dict]) -> dict:
    """Accuracy overall and per question type from per-sample records."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_type[r["type"]].append(bool(r["correct"]))
    n = len(records)
    out = {
        "accuracy": sum(r["correct"] for r in records) / max(n, 1),
        "per_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "n": n,
        "n_per_type": {t: len(v) for t, v in sorted(by_type.items())},
    }
    out["records"] = records
    return out


def majority_baseline(samples: Iterable[dict]) -> dict[str, float]:
    """Per type: share of the most frequent answer (the accuracy of answering by the prior alone)."""
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in samples:
        by_type[s["type"]][s["answer"]] += 1
    return {t: max(c.values()) / sum(c.values()) for t, c in sorted(by_type.items())}
