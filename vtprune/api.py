"""Public API: `apply`, `remove`, `pruned`, `methods`, `last_run`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .budget import Budget
from .contract.method import MethodConfig, PruningMethod
from .engine.session import PruningSession
from .errors import VtpruneError
from .models import adapter_for
from .record import RunRecord
from .registry import build_method, method_names

_ATTR = "_vtprune"


def apply(
    model: nn.Module,
    method: str | MethodConfig | PruningMethod,
    budget: int | float,
    *,
    budget_mode: str = "layer_avg",
    positions: str = "keep",
    tokenizer=None,
    **options,
) -> nn.Module:
    """Patch *this instance* so that its forward and `generate` prune visual tokens; returns the model.

    method:      a registered name (`vtprune.methods()`), a method config object or a method instance.
    budget:      an int (visual tokens per sample) or a float in (0, 1) (ratio of the visual tokens).
    budget_mode: "layer_avg" (n̄, FLOPs-equivalent) or "retained" (tokens entering layer 0).
    positions:   "keep" (original position ids, default) or "reindex" (contiguous after each event).
    tokenizer:   the model's tokenizer (or processor), for methods that read the question's words
                 (e.g. ResPrune's nouns); default: loaded from the model's local directory when needed.
    options:     the method's keyword options (e.g. `k=2` for FastV).

    Nothing is changed if any argument is invalid; no class is patched; `remove` restores the model.
    """
    if getattr(model, _ATTR, None) is not None:
        raise VtpruneError("this model is already patched by vtprune; call vtprune.remove(model) first")
    adapter = adapter_for(model)
    the_budget = Budget.parse(budget, budget_mode)
    the_method = build_method(method, options)
    session = PruningSession(  # validates, no hooks yet
        model=model, adapter=adapter, method=the_method, budget=the_budget, positions=positions, tokenizer=tokenizer
    )
    try:
        session.install()
        model.__dict__[_ATTR] = session
    except BaseException:  # all or nothing: undo every registration made so far
        session.remove()
        model.__dict__.pop(_ATTR, None)
        raise
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: removes every hook and instance attribute; the stock model is back exactly."""
    session = _session(model)
    session.remove()
    del model.__dict__[_ATTR]
    return model


@contextmanager
def pruned(model: nn.Module, method, budget, **kwargs) -> Iterator[nn.Module]:
    """`with vtprune.pruned(model, "fastv", 64): model.generate(...)` — `apply` then `remove`."""
    apply(model, method, budget, **kwargs)
    try:
        yield model
    finally:
        remove(model)


def methods() -> list[str]:
    """Names of the registered pruning methods."""
    return method_names()


def last_run(model: nn.Module) -> RunRecord | None:
    """The record of the model's last prefill (None before the first call)."""
    return _session(model).last


def session_of(model: nn.Module) -> PruningSession | None:
    """The session attached to a patched model, or None."""
    return model.__dict__.get(_ATTR)


def _session(model: nn.Module) -> PruningSession:
    session = model.__dict__.get(_ATTR)
    if session is None:
        raise VtpruneError("this model is not patched by vtprune (call vtprune.apply first)")
    return session
