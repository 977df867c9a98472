"""Every contact with transformers internals that can change between releases, in one place.

vtprune hooks the stock HuggingFace classes instead of copying their forwards, so it depends on a handful of
internal contracts: the keyword that carries the KV cache into a forward (`past_key_values` up to 5.23,
`cache` from 5.24 on) and the attribute that carries it out, the cache object's layer API, the mask builder's
signature, the rotary modules' call, Qwen's M-RoPE index helper, LLaVA-NeXT's tiling helpers, the attention
registries, and the generation keywords that select a cache.  The engine, the adapters, RCP's mask route, the
lmms-eval plugin and the bench reach transformers' internals through this module only, so a release that moves
one of them is fixed here once.

Tested range: `TESTED_MIN` ≤ transformers < `TESTED_BELOW` (CI runs both ends).  5.18 is the oldest: it
introduced `mm_encoder_outputs`, the keyword the pre-LLM path uses to hand pruned features to the stock forward
(older releases would need a second feature-injection route).  Outside the range `check_version()` warns once.
"""

from __future__ import annotations

import inspect
import warnings
from functools import lru_cache

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

TESTED_MIN = Version("5.18.0")
TESTED_BELOW = Version("5.26.0")  # newest tested: 5.25.x
TESTED_RANGE = f">={TESTED_MIN},<{TESTED_BELOW}"
VERSION = Version(transformers.__version__)

_OLD_CACHE_KWARG = "past_key_values"
_NEW_CACHE_KWARG = "cache"
# the name create_causal_mask (and, with it, every model forward and decoder layer) takes the cache under
CACHE_KWARG = (
    _NEW_CACHE_KWARG if _NEW_CACHE_KWARG in inspect.signature(create_causal_mask).parameters else _OLD_CACHE_KWARG
)
CACHE_KWARGS = (_NEW_CACHE_KWARG, _OLD_CACHE_KWARG)  # every name a caller may use (the old one is an alias)


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is outside the range vtprune's CI runs."""


_warned = False


def version_supported(version: Version | None = None) -> bool:
    """Whether `version` (default: the installed one; release part only: dev/rc builds count as their release)
    is inside the tested range."""
    version = VERSION if version is None else version
    release = Version(".".join(str(p) for p in version.release))
    return TESTED_MIN <= release < TESTED_BELOW


def check_version() -> None:
    """Warn once (not an error) when the installed transformers is outside the tested range."""
    global _warned
    if _warned or version_supported():
        return
    _warned = True
    warnings.warn(
        f"vtprune is tested with transformers {TESTED_RANGE}; found {VERSION}. It may work, but its oracles "
        f"have not been run on this version (pip install 'transformers{TESTED_RANGE}')",
        UntestedTransformersWarning,
        stacklevel=3,
    )


# --- the KV cache ------------------------------------------------------------------------------------------
def get_cache(kwargs: dict):
    """The cache a forward or `generate` call was given, under either keyword (None when absent)."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def set_cache(kwargs: dict, cache) -> None:
    """Hand `cache` to a forward under the keyword this transformers uses (the other name is removed)."""
    for name in CACHE_KWARGS:
        if name != CACHE_KWARG:
            kwargs.pop(name, None)
    kwargs[CACHE_KWARG] = cache


def output_cache(output):
    """The cache a model output carries (`.cache` from 5.24, `.past_key_values` before), or None."""
    return getattr(output, CACHE_KWARG, None)


def new_dynamic_cache(text_config) -> DynamicCache:
    """An empty `DynamicCache` with the text model's layers pre-created (what the stock forward would make)."""
    return DynamicCache(config=text_config)


def is_static_cache(cache) -> bool:
    """Caches of a fixed length (StaticCache and friends) cannot hold per-layer pruned lengths."""
    return cache is not None and bool(getattr(cache, "is_compileable", False))


def cache_length(cache, layer_idx: int = 0) -> int:
    """Tokens held by one layer of the cache (0 when there is no cache)."""
    return 0 if cache is None else int(cache.get_seq_length(layer_idx))


def cache_keys(cache, layer_idx: int) -> torch.Tensor | None:
    """Post-RoPE keys one layer holds, (B, H_kv, L, d_h), or None when the layer is empty / not a tensor cache."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) <= layer_idx:
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    return keys if isinstance(keys, torch.Tensor) and keys.dim() == 4 else None


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every key and value tensor a cache holds (for measuring its size)."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    out: list[torch.Tensor] = []
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    out.append(t)
        return out
    for pair in cache:  # legacy tuple of (key, value) per layer
        out.extend(t for t in pair if isinstance(t, torch.Tensor))
    return out


# --- generation keywords -----------------------------------------------------------------------------------
def generation_cache_problem(kwargs: dict, generation_config) -> str | None:
    """Why a `generate(**kwargs)` call cannot be pruned, or None.

    Refused: chunked prefill, any `cache_implementation` but the dynamic one, and a fixed-length cache object
    passed under either cache keyword.
    """
    if kwargs.get("prefill_chunk_size") or getattr(generation_config, "prefill_chunk_size", None):
        return "chunked prefill (prefill_chunk_size) cannot be combined with vtprune"
    impl = kwargs.get("cache_implementation") or getattr(generation_config, "cache_implementation", None)
    if impl not in (None, "dynamic"):
        return f"cache_implementation={impl!r} is not supported with vtprune; use the default DynamicCache"
    for name in CACHE_KWARGS:
        if is_static_cache(kwargs.get(name)):
            return (
                f"a static (fixed-length) cache passed as {name}= cannot hold per-layer pruned lengths; "
                "use the default DynamicCache"
            )
    return None


# --- masks, rotary, attention ------------------------------------------------------------------------------
def causal_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache, layer_idx: int, **overlays):
    """`create_causal_mask` for the rows of `inputs_embeds` (B, L, D) against layer `layer_idx`'s cache, with a
    2-D padding mask (B, L_kv); the format follows `config._attn_implementation`.  overlays: mask-function
    keywords (`or_mask_function`, `and_mask_function`), e.g. from `block_overlays`."""
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=None,
        layer_idx=layer_idx,
        **{CACHE_KWARG: cache},
        **overlays,
    )


def block_overlays(block_ids: torch.Tensor | None, sliding_window: int | None = None) -> dict:
    """Mask-function keywords for `causal_mask`: rows with the same block id >= 0 (B, L) see each other both ways
    (Gemma 3's image blocks), and with `sliding_window` only keys inside the window (kv > q − window)."""
    from transformers.masking_utils import blockwise_overlay, sliding_window_overlay

    out = {}
    if block_ids is not None:
        out["or_mask_function"] = blockwise_overlay(block_ids)
    if sliding_window is not None:
        out["and_mask_function"] = sliding_window_overlay(int(sliding_window))
    return out


def rotary_embeddings(rotary_module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin) of a language model's rotary module for `position_ids` ((B, L) or (R, B, L))."""
    return rotary_module(hidden, position_ids=position_ids)


def eager_attention():
    """The reference eager attention function (Llama's; the same math for every Llama-style family)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def attention_function(name: str):
    """The registered attention implementation `name` (sdpa, flash_attention_2, ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def register_attention(name: str, function, mask_like: str) -> None:
    """Register an attention function under `name`, with the mask builder of the backend `mask_like` (a
    custom name without a mask function would silently get no padding mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])


# --- family helpers that live in transformers' modeling files ---------------------------------------------
def qwen_rope_index(model_inner, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                    attention_mask) -> torch.Tensor:
    """Qwen2.5-VL's 3-D M-RoPE position ids of the unpruned input, (3, B, L) (its `rope_deltas` are ignored)."""
    pos, _ = model_inner.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
        attention_mask=attention_mask,
    )
    return pos


@lru_cache(maxsize=1)
def _qwen_vision_helpers():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    return apply_rotary_pos_emb_vision, get_vision_window_index


def qwen_vision_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Qwen2.5-VL's vision RoPE on (S, H, d) queries and keys."""
    return _qwen_vision_helpers()[0](q, k, cos, sin)


def qwen_vision_window_index(grid_thw, merge_size: int, window_size: int, patch_size: int) -> torch.Tensor:
    """The ViT's window permutation of merged tokens (argsort of it restores raster order)."""
    window_index, _ = _qwen_vision_helpers()[1](grid_thw, merge_size, window_size, patch_size)
    return window_index


def llava_next_tiling():
    """LLaVA-NeXT's (get_anyres_image_grid_shape, unpad_image, image_size_to_num_patches)."""
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    return get_anyres_image_grid_shape, unpad_image, image_size_to_num_patches


check_version()
