"""The offline lmms-eval tasks over the built-in shapes benchmark: `vtprune_shapes` and `vtprune_shapes_mc`.

`write_task(out)` exports the benchmark (`vtprune.testbed.export_jsonl`: `questions.jsonl`, `images/*.png`,
`scenes.jsonl`) and copies the task files beside it (`vtprune_shapes.yaml`, `vtprune_shapes_mc.yaml`,
`utils.py`); the YAMLs read `questions.jsonl` with the local `json` builder (no hub), and `utils.py` finds the
images relative to its own directory, so the folder can be moved. Then

    lmms-eval --model vtprune --model_args pretrained=builtin:shapes-llava,method=fastv,budget=64 \
        --include_path OUT --tasks vtprune_shapes

Scoring, and why it equals `vtprune eval` on the same samples (`vtprune eval --data OUT/questions.jsonl`):
`vtprune eval` prompts `USER: <image>\\n{question} ASSISTANT:` (the plugin's LLaVA default when a processor has
no chat template, as the built-in one has not), runs one greedy step and predicts the argmax of the first
token's logits over the answer vocabulary.

- `vtprune_shapes_mc` (`multiple_choice`, the plugin's `loglikelihood`): the choices are the whole answer
  vocabulary in `answer_vocabulary()` order and each is one token, so its log-likelihood is the log-softmax of
  the same first-step logits at that token; the argmax over choices is the argmax of the logits restricted to
  the answer vocabulary: the same prediction, tie-breaking included (first index).
- `vtprune_shapes` (`generate_until`, one new token, exact match): the plain greedy token. It equals the
  restricted argmax whenever the greedy token is an answer word (the built-in model answers with one on the
  held-out set); `vtprune eval` with `restrict=False` scoring is the same by construction.

Both report `exact_match` overall and per question type (`exact_match_<type>`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks" / "vtprune_shapes"
TASK_NAMES = ("vtprune_shapes", "vtprune_shapes_mc")
TASK_FILES = ("vtprune_shapes.yaml", "vtprune_shapes_mc.yaml", "utils.py")


def write_task(out: str | Path, n_per_type: int = 100, seed: int | None = None) -> Path:
    """Export `n_per_type` questions per type of the held-out set (or of `seed`) to `out` with the task files.

    -> the path of `questions.jsonl`. `lmms-eval --include_path OUT --tasks vtprune_shapes` then finds the task.
    """
    from vtprune.testbed.data import HELDOUT_SEED
    from vtprune.testbed.export import export_jsonl

    out = Path(out)
    path = export_jsonl(out, seed=HELDOUT_SEED if seed is None else seed, n_per_type=n_per_type)
    for name in TASK_FILES:
        shutil.copyfile(TASKS_DIR / name, out / name)
    return path


# --- task functions (the YAMLs reach them through the copied utils.py) -------------------------------------
def answer_choices() -> list[str]:
    """The answer vocabulary, in the order `vtprune eval` restricts the logits to."""
    from vtprune.testbed.questions import answer_vocabulary

    return list(answer_vocabulary())


def doc_to_visual(doc: dict, root: str | Path) -> list:
    """[the doc's PIL image] (RGB), its path relative to `root`."""
    from PIL import Image

    path = Path(doc["image"])
    if not path.is_absolute():
        path = Path(root) / path
    with Image.open(path) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question (with optional `pre_prompt` / `post_prompt` from the YAML; empty by default)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def normalize(text: str) -> str:
    """Lower-cased, stripped, trailing punctuation removed (the built-in model answers one word)."""
    text = text.strip().lower()
    return text.split()[0].rstrip(".,!?") if text.split() else ""


def _scores(doc: dict, prediction: str) -> dict:
    correct = float(prediction == doc["answer"])
    return {"exact_match": correct, f"exact_match_{doc['type']}": correct}


def process_results(doc: dict, results: list) -> dict:
    """generate_until: exact match of the normalised first word with the answer (overall and per type)."""
    return _scores(doc, normalize(results[0] if results else ""))


def process_results_mc(doc: dict, results: list) -> dict:
    """multiple_choice: the choice of highest log-likelihood (first on ties) against the answer."""
    lls = [float(r[0]) for r in results]
    choices = answer_choices()
    best = max(range(len(lls)), key=lambda i: (lls[i], -i))
    return _scores(doc, choices[best])
