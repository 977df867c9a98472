"""vtprune on lmms-eval (0.7.x): the `vtprune` model plugin, the offline `vtprune_shapes` tasks and the
efficiency summary of a run.

    pip install "vtprune[eval]"
    lmms-eval --model vtprune --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=64 \
        --tasks gqa,pope --batch_size 8 --log_samples --output_path runs/

lmms-eval finds the model through the entry point `lmms_eval.models: vtprune = vtprune.eval.lmms:manifest`
(declared in pyproject.toml); the model class is `vtprune.eval.lmms.model.VtpruneLMM`. Importing this
package does not import lmms_eval: only `manifest()` and the `model` module do.

- `manifest()`: the lmms-eval `ModelManifest` of the plugin (entry-point payload);
- `write_task(out, n_per_type, seed)` (`task.py`): export the built-in benchmark as JSONL + PNG together
  with the task files, for `lmms-eval --include_path OUT --tasks vtprune_shapes`;
- `summarize_efficiency(...)` (`efficiency.py`): retained / layer-averaged tokens, analytic FLOPs and
  prefill time aggregated from the per-sample fields the plugin logs.
"""

from __future__ import annotations

from .efficiency import efficiency_of_samples, read_samples, summarize_by_task, summarize_efficiency
from .task import TASK_NAMES, TASKS_DIR, write_task

MODEL_NAME = "vtprune"
MODEL_CLASS = "vtprune.eval.lmms.model.VtpruneLMM"


def manifest():
    """lmms-eval's `ModelManifest` for `--model vtprune` (called by lmms-eval's entry-point loader)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS)


__all__ = [
    "MODEL_CLASS",
    "MODEL_NAME",
    "TASKS_DIR",
    "TASK_NAMES",
    "efficiency_of_samples",
    "manifest",
    "read_samples",
    "summarize_by_task",
    "summarize_efficiency",
    "write_task",
]
