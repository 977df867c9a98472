"""Accuracy of pruned models on the built-in benchmark (and, later, lmms-eval)."""

from .compare import compare, plot_compare
from .shapes import load_samples, run_eval

__all__ = ["compare", "load_samples", "plot_compare", "run_eval"]
