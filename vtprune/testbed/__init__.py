"""Built-in offline benchmark: procedural scenes, questions, a LLaVA-1.5-geometry model and its scorer.

    from vtprune.testbed import load_builtin, balanced_samples, evaluate
    model, processor = load_builtin("shapes-llava")
    result = evaluate(model, processor, balanced_samples(seed=2, n_per_type=50))
"""

from .._lazy import lazy_exports

# public name -> submodule (imported on first access, PEP 562: `import vtprune.testbed` stays cheap)
_LAZY = {
    "builtin_names": "builtin",
    "builtin_path": "builtin",
    "load_builtin": "builtin",
    "resolve_model": "builtin",
    "balanced_samples": "data",
    "evaluate": "evaluate",
    "majority_baseline": "evaluate",
    "summarize": "evaluate",
    "export_jsonl": "export",
    "read_jsonl": "export",
    "ModelSize": "model",
    "build_config": "model",
    "build_model": "model",
    "ANSWERS": "questions",
    "QUESTION_TYPES": "questions",
    "Question": "questions",
    "candidates": "questions",
    "sample_questions": "questions",
    "DATA_VERSION": "scenes",
    "Scene": "scenes",
    "SceneObject": "scenes",
    "make_scene": "scenes",
    "patch_labels": "scenes",
    "render": "scenes",
    "build_processor": "tokenizer",
    "build_tokenizer": "tokenizer",
    "prompt": "tokenizer",
}
__all__ = sorted(_LAZY)


lazy_exports(__name__, _LAZY)
