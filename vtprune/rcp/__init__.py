"""RCP (Representation Consistency Pruner): trained plug-ins on a frozen LVLM (spec rcp.md; docs/rcp.md).

- `modules`: `CrossAttentionPruner`, `ContextEncoder`, `DelayedRepairAdapter`, `RCPPlugins` and the mask
  functions, pure tensor code on N-slot tensors (shared by the mask route and the physical route);
- `placement`: pruning / repair layers per depth and budget;
- `mask_route`: the training forward on the stock HF model (and its inference-mode twin);
- `losses`, `schedule`: the training objective and schedules;
- `data`, `train`, `cli`: JSONL data, the `accelerate` trainer, `vtprune train-rcp`;
- `checkpoint`: `rcp_plugins.safetensors` + `rcp_config.json`.
"""

import importlib
import sys
import types

# public name -> submodule (imported on first access, PEP 562: `import vtprune.rcp` stays cheap)
_LAZY = {
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ContextEncoder": "modules",
    "CrossAttentionPruner": "modules",
    "DelayedRepairAdapter": "modules",
    "PruneOut": "modules",
    "RCPPlugins": "modules",
    "centred_baseline": "modules",
    "inference_mask": "modules",
    "mask_step": "modules",
    "table_coords": "modules",
    "training_mask": "modules",
    "Placement": "placement",
    "placement_for": "placement",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:  # a submodule not imported yet (the eager package used to import them all)
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """A lazily exported function named like its submodule (e.g. `evaluate` in `evaluate.py`) stays the function
    when the submodule is imported (the import system sets the submodule as an attribute of its package)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return  # the submodule stays reachable through sys.modules and `from ... import`
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
