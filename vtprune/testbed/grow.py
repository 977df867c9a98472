"""Function-preserving depth growth of a built-in model's decoder (progressive stacking).

A shallow decoder learns the testbed's look-ups several times faster per step than a deep narrow one
(docs/testbed.md, "v3 training"), while the v3 benchmark needs LLaVA-1.5-7B's 32 layers for the in-LLM
methods' schedules. `grow_decoder` turns a trained L-layer model into a deeper one that computes exactly
the same function: every new layer is a copy of a trained layer whose residual outputs (`self_attn.o_proj`,
`mlp.down_proj`) are zero, so it adds 0 to the residual stream until training moves those projections.
Their inputs are those of a trained layer, so the first gradients on them are informative.

    grown = grow_decoder(model, layers=32)                  # trained layers at 0, 8, 16, 24 ("spread")
    grown = grow_decoder(model, layers=32, placement="spread_next")  # the same, copies of the next trained layer
    grown = grow_decoder(model, layers=32, placement="front")  # trained layers at 0..L-1
    grown = grow_decoder(model, layers=32, copy_output_scale=0.05)  # copies add 5 % of their source's output

Which trained layer a zero-output copy takes its weights from does not change the function, but it decides what the
copy's attention looks like, which methods that rank tokens by a layer's attention read. Between two trained layers
every copy sees the same residual stream, the input of the next trained layer (the copies add nothing), so a copy of
the *next* trained layer ("spread_next") attends exactly as that layer will; a copy of the *previous* one ("spread")
applies that layer's query and key weights to an input it never saw. Measured on the v3 preview (docs/testbed.md,
"v3 training: twenty-second session"): with "spread" the answer position's attention at layers 2-8 put 0.00-0.03 on
the named object, where the next trained layer (9) put 0.93 on it for shape questions.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

PLACEMENTS = ("spread", "spread_next", "front")
_LAYER_KEY = re.compile(r"^(model\.language_model\.layers\.)(\d+)\.(.+)$")
_RESIDUAL_OUTPUTS = ("self_attn.o_proj.", "mlp.down_proj.")


def growth_plan(source_layers: int, layers: int, placement: str = "spread") -> list[tuple[int, bool]]:
    """For each of `layers` new decoder layers: (source layer it copies, True if it is that trained layer,
    False if a zero-output copy). "spread": trained layer s sits at floor(s * layers / source_layers), each
    followed by zero-output copies of itself; "spread_next": the same positions, each copy taken from the next
    trained layer (copies after the last trained layer: of the last one); "front": trained layers first, then copies
    of the last one."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r} (accepted: {', '.join(PLACEMENTS)})")
    if source_layers < 1 or layers < source_layers:
        raise ValueError(f"cannot grow a {source_layers}-layer decoder to {layers} layers (need layers >= "
                         f"{source_layers})")
    if placement == "front":
        starts = list(range(source_layers))
    else:
        starts = [s * layers // source_layers for s in range(source_layers)]
    plan: list[tuple[int, bool]] = []
    for i in range(layers):
        s = max(j for j, start in enumerate(starts) if start <= i)
        if placement == "spread_next" and starts[s] != i and s + 1 < source_layers:
            s += 1  # a copy of the trained layer that follows it
        plan.append((s, starts[s] == i))
    return plan


@torch.no_grad()
def grow_decoder(model: LlavaForConditionalGeneration, layers: int, placement: str = "spread",
                 copy_output_scale: float = 0.0) -> LlavaForConditionalGeneration:
    """A new `LlavaForConditionalGeneration` with a `layers`-deep decoder computing exactly what `model`
    computes (same dtype; `model` is not modified). See `growth_plan` for where the trained layers go.
    `copy_output_scale` > 0: the copies' residual outputs are that fraction of their source's instead of zero, so
    each copy adds a little from the start (the function changes; a start for training the copies at depth)."""
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(f"grow_decoder needs a LlavaForConditionalGeneration, got {type(model).__name__}")
    if not 0.0 <= copy_output_scale <= 1.0:
        raise ValueError(f"copy_output_scale must be in [0, 1], got {copy_output_scale}")
    source_layers = model.config.text_config.num_hidden_layers
    plan = growth_plan(source_layers, layers, placement)
    config = copy.deepcopy(model.config)
    config.text_config.num_hidden_layers = layers
    if getattr(config.text_config, "layer_types", None) is not None:  # one entry per layer in newer configs
        config.text_config.layer_types = [config.text_config.layer_types[s] for s, _ in plan]
    dtype = next(model.parameters()).dtype
    grown = LlavaForConditionalGeneration(config).to(dtype)
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m:
            by_layer.setdefault(int(m.group(2)), {})[m.group(3)] = value
        else:
            state[key] = value.clone()
    for i, (s, trained) in enumerate(plan):
        for name, value in by_layer[s].items():
            scaled = not trained and name.startswith(_RESIDUAL_OUTPUTS)  # zero (default) or a fraction
            state[f"model.language_model.layers.{i}.{name}"] = value * copy_output_scale if scaled else value.clone()
    grown.load_state_dict(state, strict=True)
    grown.generation_config = copy.deepcopy(model.generation_config)
    return grown.eval()


def grow_saved(source: str | Path, folder: str | Path, layers: int, placement: str = "spread",
               copy_output_scale: float = 0.0, replace: bool = False) -> int:
    """`folder` = the model at `source` (builtin:NAME or a directory) with its decoder grown (`grow_decoder`), saved
    in the loaded model's dtype and atomically (`replace`: an existing `folder` is replaced, e.g. an interrupted
    try; else refused). -> the source's decoder depth."""
    from .builtin import resolve_model
    from .train import export_atomic

    model, processor = resolve_model(str(source))
    grown = grow_decoder(model, layers, placement, copy_output_scale)
    export_atomic(grown, processor, folder, dtype=next(model.parameters()).dtype, replace=replace)
    return model.config.text_config.num_hidden_layers
