"""Built-in offline benchmark: procedural scenes, questions, a LLaVA-1.5-geometry model and its scorer.

    from vtprune.testbed import load_builtin, balanced_samples, evaluate
    model, processor = load_builtin("shapes-llava")
    result = evaluate(model, processor, balanced_samples(seed=2, n_per_type=50))
"""

import importlib
import sys
import types

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


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:  # a submodule not imported yet (the eager package used to import them all)
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """A lazily exported function named like its submodule (e.g. `evaluate` in `evaluate.py`) stays the function
    when the submodule is imported (the import system sets the submodule as an attribute of its package)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return  # the submodule stays reachable through sys.modules and `from ... import`
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
