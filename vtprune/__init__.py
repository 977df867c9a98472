"""vtprune: physical visual-token pruning for HuggingFace vision-language models.

    import vtprune
    vtprune.apply(model, "fastv", budget=64)      # patch this instance
    out = model.generate(**inputs)                # pruned prefill, pruned KV cache
    vtprune.last_run(model).samples[0].layer_avg_tokens
    vtprune.remove(model)                         # stock model again

`import vtprune` is cheap: torch, transformers, the adapters and the methods are imported on first use of a
name that needs them (PEP 562 module `__getattr__`), so `vtprune --help` starts in well under a second.
"""

from __future__ import annotations

from ._lazy import LazyPackage, lazy_exports
from .errors import BudgetError, UnknownMethodError, UnsupportedInputError, UnsupportedModelError, VtpruneError

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported on first access)
_LAZY = {
    "apply": "api",
    "last_run": "api",
    "pruned": "api",
    "remove": "api",
    "session_of": "api",
    "Budget": "budget",
    "KeepPlan": "methods",
    "MethodConfig": "methods",
    "PruningMethod": "methods",
    "Stage": "methods",
    "register": "methods",
    "supported_model_classes": "models",
    "PruningEvent": "record",
    "RunRecord": "record",
    "SampleRecord": "record",
}

__all__ = [
    "Budget",
    "BudgetError",
    "KeepPlan",
    "MethodConfig",
    "PruningEvent",
    "PruningMethod",
    "RunRecord",
    "SampleRecord",
    "Stage",
    "UnknownMethodError",
    "UnsupportedInputError",
    "UnsupportedModelError",
    "VtpruneError",
    "apply",
    "last_run",
    "methods",
    "pruned",
    "register",
    "remove",
    "session_of",
    "supported_model_classes",
]


def _methods() -> list[str]:
    """Names of the registered pruning methods."""
    from .api import methods as registered

    return registered()


_methods.__name__ = _methods.__qualname__ = "methods"


class _Package(LazyPackage):
    """`vtprune.methods` is the function `vtprune.methods()` (as before the lazy imports), although the
    subpackage `vtprune.methods` has the same name: importing the subpackage (which the import system
    records as an attribute of its parent) must not replace the function. The subpackage stays reachable
    as `sys.modules["vtprune.methods"]` and through `from vtprune.methods import ...`."""

    @property
    def methods(self):
        return _methods

    @methods.setter
    def methods(self, value) -> None:  # the import system setting the subpackage: keep the function
        pass


lazy_exports(__name__, _LAZY, _Package)
