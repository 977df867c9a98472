"""Registry of pruning methods: names -> classes, and building a method from a name, a config or an instance.

Method files register themselves with `@register` when `vtprune.methods` is imported; every lookup here
imports that package first (by name, so this module depends only on the contract).
"""

from __future__ import annotations

import importlib

from .contract.errors import UnknownMethodError, VtpruneError
from .contract.method import MethodConfig, PruningMethod

_REGISTRY: dict[str, type[PruningMethod]] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[PruningMethod] | None = None, *, aliases: tuple[str, ...] = ()):
    """Class decorator that registers a method under `cls.name` (and optional aliases)."""

    def wrap(c: type[PruningMethod]) -> type[PruningMethod]:
        if c.name in _REGISTRY and _REGISTRY[c.name] is not c:
            raise VtpruneError(f"a method named {c.name!r} is already registered")
        _REGISTRY[c.name] = c
        for a in aliases:
            _ALIASES[a] = c.name
        return c

    return wrap(cls) if cls is not None else wrap


def method_names() -> list[str]:
    """Registered method names, sorted."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[PruningMethod]:
    """The class registered under `name` (or an alias)."""
    _load_builtin_methods()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _REGISTRY[key]


def build_method(method: str | MethodConfig | PruningMethod, options: dict) -> PruningMethod:
    """Instantiate a method from a name + keyword options, a config object, or an instance."""
    if isinstance(method, PruningMethod):
        if options:
            raise VtpruneError("options cannot be combined with a method instance; put them in its config")
        return method
    if isinstance(method, MethodConfig):
        _load_builtin_methods()
        cls = next((c for c in _REGISTRY.values() if type(method) is c.config_class), None)
        if cls is None:
            raise UnknownMethodError(f"no registered method uses config class {type(method).__name__}")
        if options:
            raise VtpruneError("options cannot be combined with a config object; set them on the config")
        return cls(method)
    if not isinstance(method, str):
        raise UnknownMethodError(f"method must be a name or a config object, got {type(method).__name__}")
    cls = method_class(method)
    valid = cls.config_class.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise VtpruneError(f"method {cls.name!r} has no option(s) {unknown}; valid options: {valid}")
    return cls(cls.config_class(**options))




def _load_builtin_methods() -> None:
    """Import `vtprune.methods` (its modules register the built-in methods); a no-op once imported."""
    importlib.import_module("vtprune.methods")
