"""The neutral contract between methods, adapters and the engine: nothing here imports the rest of vtprune.

- `method`: `Stage`, `KeepPlan`, `ImageTokens`, `MethodConfig` / `option`, `PruningMethod` and the small tensor
  helpers every method shares (`stable_topk`, `one_cut_keep`);
- `signals`: the names of the signals a method can request and their shapes;
- `errors`: the error types every layer raises (public path: `vtprune.errors`).

Methods, adapters and the engine depend on this package; it depends on none of them (checked by import-linter,
`pyproject.toml` `[tool.importlinter]`).
"""

from .errors import (
    BudgetError,
    CheckpointError,
    UnknownMethodError,
    UnsupportedInputError,
    UnsupportedModelError,
    VtpruneError,
)

# `vtprune.errors` (imported by `import vtprune`) lives here, so the torch-dependent parts load on first access
_SUBMODULE = {name: "method" for name in (
    "BudgetRequest", "ImageTokens", "KeepPlan", "MethodConfig", "PruningMethod", "Stage", "StageKind", "one_cut_keep",
    "option", "stable_topk",
)} | {name: "signals" for name in ("LLM_SIGNALS", "TEXT_SIGNALS", "VIEW_SIGNALS", "VISION_SIGNALS")}


def __getattr__(name: str):
    if name in _SUBMODULE:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BudgetError",
    "BudgetRequest",
    "CheckpointError",
    "ImageTokens",
    "KeepPlan",
    "LLM_SIGNALS",
    "MethodConfig",
    "PruningMethod",
    "Stage",
    "StageKind",
    "TEXT_SIGNALS",
    "UnknownMethodError",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "VIEW_SIGNALS",
    "VISION_SIGNALS",
    "VtpruneError",
    "one_cut_keep",
    "option",
    "stable_topk",
]
