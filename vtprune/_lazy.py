"""Lazy package exports (PEP 562), one mechanism for every vtprune package, so `import vtprune` stays cheap.

`lazy_exports(__name__, {"public_name": "submodule", ...})` at the end of a package's `__init__` makes each
name import its submodule on first access, makes not-yet-imported submodules reachable as attributes, lists
both in `dir()`, and keeps a function that is named like its own submodule (e.g. `testbed.evaluate` in
`evaluate.py`) the function when that submodule is imported (the import system sets a submodule as an
attribute of its package).
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """Module class of a package with lazy exports (see `lazy_exports`)."""

    _lazy: dict[str, str] = {}

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and self._lazy.get(name) == name:
            return  # the submodule stays reachable through sys.modules and `from ... import`
        super().__setattr__(name, value)


def lazy_exports(package: str, lazy: dict[str, str], cls: type[LazyPackage] = LazyPackage) -> None:
    """Install the lazy exports `lazy` (public name -> submodule) on the package module `package`."""
    module = sys.modules[package]

    def __getattr__(name: str):
        sub = lazy.get(name)
        if sub is None:  # a submodule not imported yet
            try:
                return importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{sub}", package), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(getattr(module, "__all__", ())))

    module.__getattr__ = __getattr__
    module.__dir__ = __dir__
    module.__class__ = cls
    module._lazy = lazy
