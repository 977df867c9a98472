"""RCP (Representation Consistency Pruner): trained plug-ins on a frozen LVLM (spec rcp.md; docs/rcp.md).

- `modules`: `CrossAttentionPruner`, `ContextEncoder`, `DelayedRepairAdapter`, `RCPPlugins` and the mask
  functions, pure tensor code on N-slot tensors (shared by the mask route and the physical route);
- `placement`: pruning / repair layers per depth and budget;
- `mask_route`: the training forward on the stock HF model (and its inference-mode twin);
- `losses`, `schedule`: the training objective and schedules;
- `data`, `train`, `cli`: JSONL data, the `accelerate` trainer, `vtprune train-rcp`;
- `checkpoint`: `rcp_plugins.safetensors` + `rcp_config.json`.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .modules import (
    ContextEncoder,
    CrossAttentionPruner,
    DelayedRepairAdapter,
    PruneOut,
    RCPPlugins,
    centred_baseline,
    inference_mask,
    mask_step,
    table_coords,
    training_mask,
)
from .placement import Placement, placement_for

__all__ = [
    "ContextEncoder",
    "CrossAttentionPruner",
    "DelayedRepairAdapter",
    "Placement",
    "PruneOut",
    "RCPPlugins",
    "centred_baseline",
    "inference_mask",
    "load_checkpoint",
    "mask_step",
    "placement_for",
    "save_checkpoint",
    "table_coords",
    "training_mask",
]
