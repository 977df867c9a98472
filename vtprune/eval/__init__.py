"""Accuracy of pruned models on the built-in benchmark (and, later, lmms-eval)."""

from .._lazy import lazy_exports

# public name -> submodule (imported on first access, PEP 562: `import vtprune.eval` stays cheap)
_LAZY = {
    "compare": "compare",
    "plot_compare": "compare",
    "load_samples": "shapes",
    "run_eval": "shapes",
}
__all__ = sorted(_LAZY)


lazy_exports(__name__, _LAZY)
