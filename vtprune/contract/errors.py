"""Errors raised by vtprune. Every one names the offending input and, where useful, the valid choices."""

from __future__ import annotations


class VtpruneError(ValueError):
    """Base class of every error vtprune raises on bad input."""


class BudgetError(VtpruneError):
    """The budget is out of range, of the wrong type, or infeasible for the method."""


class UnknownMethodError(VtpruneError):
    """The method name is not registered."""


class UnsupportedModelError(VtpruneError):
    """No adapter exists for the model class."""


class UnsupportedInputError(VtpruneError):
    """The call cannot be pruned correctly (static cache, chunked prefill, compile, missing ids, ...)."""


class CheckpointError(VtpruneError):
    """A checkpoint or state folder is damaged, incomplete, of an old (pickle) format, or does not fit the run;
    the message says how to start fresh."""

__all__ = [
    "VtpruneError",
    "BudgetError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "UnsupportedInputError",
    "CheckpointError",
]
