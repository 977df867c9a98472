"""vtprune: physical visual-token pruning for HuggingFace vision-language models.

    import vtprune
    vtprune.apply(model, "fastv", budget=64)      # patch this instance
    out = model.generate(**inputs)                # pruned prefill, pruned KV cache
    vtprune.last_run(model).samples[0].layer_avg_tokens
    vtprune.remove(model)                         # stock model again
"""

from .api import apply, last_run, methods, pruned, remove, session_of
from .budget import Budget
from .errors import BudgetError, UnknownMethodError, UnsupportedInputError, UnsupportedModelError, VtpruneError
from .methods import KeepPlan, MethodConfig, PruningMethod, Stage, register
from .models import supported_model_classes
from .record import PruningEvent, RunRecord, SampleRecord

__version__ = "0.1.0"

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
