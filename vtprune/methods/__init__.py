"""Registry of pruning methods. Adding a method = one new file in this package with an `@register` class."""

from __future__ import annotations

from ..errors import UnknownMethodError, VtpruneError
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, stable_topk

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
    return sorted(_REGISTRY)


def method_class(name: str) -> type[PruningMethod]:
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
