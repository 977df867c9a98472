"""RCP (Representation Consistency Pruner): trained plug-ins on a frozen LVLM (spec rcp.md; docs/rcp.md).

- `modules`: `CrossAttentionPruner`, `ContextEncoder`, `DelayedRepairAdapter`, `RCPPlugins` and the mask
  functions, pure tensor code on N-slot tensors (shared by the mask route and the physical route);
- `placement`: pruning / repair layers per depth and budget;
- `mask_route`: the training forward on the stock HF model (and its inference-mode twin);
- `losses`, `schedule`: the training objective and schedules;
- `data`, `train`, `cli`: JSONL data, the `accelerate` trainer, `vtprune train-rcp`;
- `testbed_data`: training data from the built-in benchmark v3's calibration split (never the test split);
- `ablations`: adapter-off and untrained-pruner checkpoints of a trained one (for cards);
- `checkpoint`: `rcp_plugins.safetensors` + `rcp_config.json` + the card `README.md` (convergence recorded;
  loading a run that did not reach its budget warns with `RCPConvergenceWarning`).
"""

from .._lazy import lazy_exports

# public name -> submodule (imported on first access, PEP 562: `import vtprune.rcp` stays cheap)
_LAZY = {
    "RCPConvergenceWarning": "checkpoint",
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
    "scaled_width": "modules",
    "table_coords": "modules",
    "training_mask": "modules",
    "Placement": "placement",
    "placement_for": "placement",
}
__all__ = sorted(_LAZY)


lazy_exports(__name__, _LAZY)
