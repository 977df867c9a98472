"""Weight averaging ("model soup") of built-in models fine-tuned from one parent.

Runs continued from the same model for an hour or so stay in one basin of the loss, and the mean of their weights
is a model whose noisy outputs are steadier than each run's: on the v3 testbed soups of two to five continuations of
one model counted about three points better than their members (docs/testbed.md, "v3 training: twenty-fourth
session"). Models several runs apart do not average (seven runs over three generations of one lineage: counting
0.37; a parent with its children: 0.74, below each of them), so `average_models` only checks that the models have
one architecture; which models belong together is the caller's measurement.

    souped = average_models([model_a, model_b])          # the uniform mean, float32 arithmetic, first model's dtype
    soup_saved(["runs/u25/model", "runs/u27/model"], "runs/soup")   # the same from directories, saved atomically
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

#: config entries that do not describe the architecture (where and with what the model was saved)
_IGNORED_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")


def _architecture(model: LlavaForConditionalGeneration) -> dict:
    def strip(d: dict) -> dict:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _IGNORED_CONFIG_KEYS}

    return strip(model.config.to_dict())


@torch.no_grad()
def average_models(models: Sequence[LlavaForConditionalGeneration],
                   weights: Sequence[float] | None = None) -> LlavaForConditionalGeneration:
    """A new model (on the CPU) whose every parameter and buffer is the (weighted) mean of `models`' (float32
    arithmetic, cast to the first model's dtype); the inputs are not modified. `weights`: one non-negative number per
    model, normalised to sum 1 (default: uniform). Raises ValueError unless there are at least two models of one
    architecture."""
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"a soup needs at least two models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, LlavaForConditionalGeneration):
            raise TypeError(f"model {i} is a {type(m).__name__}, not a LlavaForConditionalGeneration")
    w = torch.ones(len(models), dtype=torch.float64) if weights is None else torch.tensor(weights, dtype=torch.float64)
    if w.shape != (len(models),) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum, got {weights}")
    w = (w / w.sum()).tolist()
    first = _architecture(models[0])
    states = [m.state_dict() for m in models]
    for i, (m, sd) in enumerate(zip(models[1:], states[1:], strict=True), start=1):
        arch = _architecture(m)
        if arch != first:
            diff = sorted(k for k in set(first) | set(arch) if first.get(k) != arch.get(k))
            raise ValueError(f"model {i} has another architecture than model 0 (config differs in: {', '.join(diff)})")
        if sd.keys() != states[0].keys() or any(sd[k].shape != v.shape for k, v in states[0].items()):
            raise ValueError(f"model {i}'s weights do not match model 0's names and shapes")
    dtype = next(models[0].parameters()).dtype
    mean = {}
    for key, value in states[0].items():
        if not value.is_floating_point():  # integer buffers (e.g. position ids) must agree, not be averaged
            if any(not torch.equal(sd[key], value) for sd in states[1:]):
                raise ValueError(f"the models' integer buffer {key} differs; it cannot be averaged")
            mean[key] = value.clone()
            continue
        acc = torch.zeros(value.shape, dtype=torch.float32)
        for wi, sd in zip(w, states, strict=True):
            acc += wi * sd[key].detach().float().cpu()
        mean[key] = acc.to(value.dtype)
    souped = LlavaForConditionalGeneration(copy.deepcopy(models[0].config)).to(dtype)
    souped.load_state_dict(mean, strict=True)
    souped.generation_config = copy.deepcopy(models[0].generation_config)
    return souped.eval()


def soup_saved(sources: Sequence[str | Path], folder: str | Path, weights: Sequence[float] | None = None,
               replace: bool = False) -> None:
    """`folder` = `average_models` of the models at `sources` (builtin:NAME or directories), saved in the dtype the
    first model is stored in (`stored_dtype`) with its processor, atomically (`replace`: an existing `folder` is
    replaced, else refused). The models must share one vocabulary (ValueError otherwise)."""
    from .builtin import resolve_model
    from .train import export_atomic

    loaded = [resolve_model(str(s)) for s in sources]
    vocab = loaded[0][1].tokenizer.get_vocab()
    for s, (_, processor) in zip(sources[1:], loaded[1:], strict=True):
        if processor.tokenizer.get_vocab() != vocab:
            raise ValueError(f"{s} has another vocabulary than {sources[0]}; models of one soup share one tokenizer")
    souped = average_models([m for m, _ in loaded], weights)  # loaded in float32: the mean in float32
    export_atomic(souped, loaded[0][1], folder, dtype=stored_dtype(sources[0]), replace=replace)


def stored_dtype(source: str | Path) -> torch.dtype:
    """The dtype the weights of a saved model (builtin:NAME or a directory) are stored in (its first tensor's)."""
    from safetensors import safe_open

    from .builtin import BUILTIN_PREFIX, builtin_path

    s = str(source)
    folder = builtin_path(s[len(BUILTIN_PREFIX):]) if s.startswith(BUILTIN_PREFIX) else Path(s)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{source} holds no safetensors weights")
    with safe_open(str(files[0]), "pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype
