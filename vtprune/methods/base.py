"""The method contract, re-exported for method files (`from .base import ...`); defined in `vtprune.contract`."""

from ..contract.method import (  # noqa: F401
    ImageTokens,
    KeepPlan,
    MethodConfig,
    PruningMethod,
    Stage,
    StageKind,
    one_cut_keep,
    option,
    stable_topk,
)
