"""Real VLM architectures with random weights, built from bundled config files (no downloads).

    model = build_arch("llava-1.5-7b", layers=2, dtype=torch.bfloat16)   # real widths, 2 decoder layers
    dims = full_dims("llava-1.5-7b")                                      # LLMDims of the full 32 layers

The configs in ``vtprune/assets/arch/*.json`` hold the public sizes of the named checkpoints (vocab,
widths, heads, depths, special token ids), never weights. Building skips the slow default init:
parameters are created on the meta device, materialised uninitialised (``to_empty`` for parameters)
and filled by one vectorised call per parameter (normal std 0.02 for matrices and embeddings, zeros
for biases, ones for norm weights; see ``_fast_init``). Buffers (rotary ``inv_freq``, CLIP
``position_ids``) are computed for real at construction and kept, because ``to_empty`` on the whole
module would leave them uninitialised. About 5-12 s for ``llava-1.5-7b`` with ``layers=1`` on one
shared CPU thread, mostly first-touch of the 0.8 B parameters' memory.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from functools import cache
from importlib import resources

import torch
from torch import nn

from ..measurement.flops import LLMDims

__all__ = ["ARCH_NAMES", "arch_config", "build_arch", "full_dims", "parse_arch_id"]

ARCH_NAMES: tuple[str, ...] = (
    "llava-1.5-7b",
    "llava-1.5-13b",
    "llava-next-7b",
    "qwen2.5-vl-3b",
    "qwen2.5-vl-7b",
    "qwen3-vl-8b",
    "llava-onevision-7b",
    "gemma-3-4b",
    "gemma-3-12b",
    "internvl3-8b",
)
_PREFIX = "arch:"


def parse_arch_id(model_id: str) -> str | None:
    """``"arch:llava-1.5-7b"`` -> ``"llava-1.5-7b"``; anything else -> None."""
    if not model_id.startswith(_PREFIX):
        return None
    name = model_id[len(_PREFIX) :].lower()
    _check_name(name)
    return name


def _check_name(name: str) -> None:
    if name not in ARCH_NAMES:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCH_NAMES)}")


@cache
def _raw(name: str) -> dict:
    _check_name(name)
    text = resources.files("vtprune").joinpath(f"assets/arch/{name}.json").read_text()
    return json.loads(text)


def arch_config(name: str, layers: int | None = None):
    """The HF config of a named architecture; ``layers`` truncates the decoder (``text_config``)."""
    from transformers import CONFIG_MAPPING

    raw = copy.deepcopy(_raw(name))
    raw.pop("_source", None)
    model_type = raw.pop("model_type")
    full = raw["text_config"]["num_hidden_layers"]
    if layers is not None:
        if not 1 <= layers <= full:
            raise ValueError(f"layers must be in [1, {full}] for {name}, got {layers}")
        raw["text_config"]["num_hidden_layers"] = int(layers)
        if "max_window_layers" in raw["text_config"]:
            raw["text_config"]["max_window_layers"] = int(layers)
    return CONFIG_MAPPING[model_type](**raw)


def full_dims(name: str) -> LLMDims:
    """Decoder dimensions of the full-depth model (for FLOPs at full depth when built with ``layers``)."""
    return LLMDims.from_config(arch_config(name).text_config)


def _model_class(config):
    import transformers

    return getattr(transformers, config.architectures[0])


@contextmanager
def _parameters_on_meta():
    """Like ``with torch.device("meta")`` for parameters only: buffers are still computed for real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


_POOL = 4_194_301  # a prime, so that tiles of the pool never line up with rows of a weight matrix


def _fast_init(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Normal(0, std) matrices/embeddings, zero biases, unit norms: one vectorised fill per parameter.

    Drawing 7 B normal samples costs ~20 ns each on one CPU thread, so parameters larger than a pool of
    ~4 M N(0, std) draws are filled with copies of the pool at random offsets (random-weight benchmarks
    only need the right scale, not independent entries).
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = torch.randn(2 * _POOL, generator=gen).mul_(std)
    pools: dict[torch.dtype, torch.Tensor] = {}
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for pname, p in module.named_parameters(recurse=False):
                if pname == "bias" or not p.is_floating_point():
                    p.zero_()
                elif is_norm:
                    p.fill_(1.0)
                elif p.numel() <= _POOL:
                    p.copy_(torch.randn(p.shape, generator=gen).mul_(std))
                else:
                    src = pools.setdefault(p.dtype, pool.to(device=device, dtype=p.dtype))
                    flat = p.view(-1)
                    for start in range(0, flat.numel(), _POOL):
                        n = min(_POOL, flat.numel() - start)
                        off = int(torch.randint(0, _POOL, (1,), generator=gen))
                        flat[start : start + n].copy_(src[off : off + n])


def _materialise(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """``to_empty`` for parameters only: each meta parameter becomes an uninitialised one of ``dtype`` on
    ``device`` (tied parameters stay tied); buffers keep the values computed at construction."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                new_dtype = dtype if p.is_floating_point() else p.dtype
                done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=new_dtype, device=device), False)
            module._parameters[pname] = done[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[bname] = b.to(device)


def build_arch(
    name: str,
    layers: int | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    attn: str = "sdpa",
    seed: int = 0,
) -> nn.Module:
    """The real architecture ``name`` (see ``ARCH_NAMES``) with random weights, in eval mode.

    layers: keep only the first N decoder layers (vision tower and projector stay complete).
    Rotary ``inv_freq`` buffers stay float32, as with ``from_pretrained(dtype=...)``.
    """
    config = arch_config(name, layers)
    config._attn_implementation = attn
    cls = _model_class(config)
    with _parameters_on_meta():
        model = cls(config)
    _materialise(model, dtype, torch.device(device))
    _fast_init(model, seed=seed)
    model.eval()
    model.set_attn_implementation(attn)
    gc = model.generation_config
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config.text_config, "pad_token_id", None)
    gc.pad_token_id = pad if pad is not None else 0
    gc.eos_token_id = None
    return model
