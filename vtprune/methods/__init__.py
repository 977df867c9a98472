"""The built-in pruning methods: one file per method, each registering itself with `@register`.

Adding a method = one new file in this package with an `@register` class. The registry itself is
`vtprune.registry`; the contract a method implements is `vtprune.contract`.
"""

from __future__ import annotations

from ..contract.method import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, stable_topk
from ..registry import build_method, method_class, method_names, register


def _import_builtin_methods() -> None:
    """Import every module of this package: each built-in method registers itself on import, so adding a
    method is adding a file."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_builtin_methods()

__all__ = [
    "ImageTokens",
    "KeepPlan",
    "MethodConfig",
    "PruningMethod",
    "Stage",
    "build_method",
    "method_class",
    "method_names",
    "register",
    "stable_topk",
]
