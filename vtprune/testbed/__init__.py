"""Built-in offline benchmark: procedural scenes, questions, a LLaVA-1.5-geometry model and its scorer.

    from vtprune.testbed import load_builtin, balanced_samples, evaluate
    model, processor = load_builtin("shapes-llava")
    result = evaluate(model, processor, balanced_samples(seed=2, n_per_type=50))
"""

from .builtin import builtin_names, builtin_path, load_builtin, resolve_model
from .data import balanced_samples
from .evaluate import evaluate, majority_baseline, summarize
from .export import export_jsonl, read_jsonl
from .model import ModelSize, build_config, build_model
from .questions import ANSWERS, QUESTION_TYPES, Question, candidates, sample_questions
from .scenes import DATA_VERSION, Scene, SceneObject, make_scene, patch_labels, render
from .tokenizer import build_processor, build_tokenizer, prompt

__all__ = [
    "ANSWERS", "DATA_VERSION", "QUESTION_TYPES", "ModelSize", "Question", "Scene", "SceneObject",
    "balanced_samples", "build_config", "build_model", "build_processor", "build_tokenizer", "builtin_names",
    "builtin_path", "candidates", "evaluate", "export_jsonl", "load_builtin", "majority_baseline",
    "make_scene", "patch_labels", "prompt", "read_jsonl", "render", "resolve_model", "sample_questions",
    "summarize",
]
