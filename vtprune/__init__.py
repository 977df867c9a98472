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
    "ImageTokens": "contract",
    "KeepPlan": "contract",
    "MethodConfig": "contract",
    "PruningMethod": "contract",
    "Stage": "contract",
    "method_names": "registry",
    "register": "registry",
    "supported_model_classes": "models",
    "PruningEvent": "record",
    "RunRecord": "record",
    "SampleRecord": "record",
}

__all__ = [
    "Budget",
    "BudgetError",
    "ImageTokens",
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
    "method_names",
    "methods",
    "pruned",
    "register",
    "remove",
    "session_of",
    "supported_model_classes",
]


class _MethodsAttribute:
    """`vtprune.methods`: call it for the registered method names (`vtprune.methods()`, as
    `vtprune.method_names()`), or use it as the subpackage `vtprune.methods` (`vtprune.methods.downsample`,
    `vtprune.methods.PruningMethod`): attribute access goes to the subpackage, imported on first use."""

    __name__ = "methods"
    __qualname__ = "methods"

    def __call__(self) -> list[str]:
        """Names of the registered pruning methods."""
        from .registry import method_names

        return method_names()

    def __getattr__(self, name: str):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.methods"), name)

    def __dir__(self) -> list[str]:
        import importlib

        return dir(importlib.import_module(f"{__name__}.methods"))

    def __repr__(self) -> str:
        return "<vtprune.methods: call for the registered method names; attributes are the subpackage's>"


_methods = _MethodsAttribute()


class _Package(LazyPackage):
    """`vtprune.methods` is both the function `vtprune.methods()` and the subpackage's namespace (see
    `_MethodsAttribute`): the import system setting the subpackage as an attribute of its parent must not
    replace it."""

    @property
    def methods(self):
        return _methods

    @methods.setter
    def methods(self, value) -> None:  # the import system setting the subpackage: keep the proxy
        pass


lazy_exports(__name__, _LAZY, _Package)
