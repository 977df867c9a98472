"""Analytic prefill/decode FLOPs and KV-cache bytes (spec README §2, §4, §5).

Pure Python arithmetic: no torch, no model weights. All FLOP functions return raw counts (divide by
1e12 for the "T" columns of the spec). Three LLM conventions, with ``n`` = total sequence length
entering a decoder layer (visual + text), excluding embeddings, norms, RoPE, softmax and the LM head:

- ``"fastv"``  (headline, multiply-accumulates, FFN as two matrices, assumes H_kv = H):
  ``f(n) = 4·n·d² + 2·n²·d + 2·n·d·m``
- ``"swiglu"`` (SparseVLM / ViTCoP counters): ``f(n) = 4·n·d² + 2·n²·d + 3·n·d·m``
- ``"exact"``  (true FLOPs = 2 per MAC, GQA-aware, dense n² attention):
  ``f(n) = 2·[n·d·H·d_h + 2·n·d·H_kv·d_h + n·H·d_h·d + 2·n²·H·d_h + 3·n·d·m]``

Prefill total = ``Σ_ℓ f(n_ℓ + n_text)`` where ``n_ℓ`` is the number of visual tokens *entering*
decoder layer ℓ (input convention, §4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = [
    "CONVENTIONS",
    "Convention",
    "FlopsReport",
    "LLMDims",
    "LLM_PRESETS",
    "QwenVisionDims",
    "VISION_PRESETS",
    "VisionDims",
    "decode_flops",
    "kv_cache_bytes",
    "layer_avg_tokens",
    "layer_flops",
    "prefill_flops",
    "prefill_flops_all",
    "projector_flops",
    "qwen_vit_flops",
    "retained_tokens",
    "tokens_per_layer",
    "vision_flops",
    "visual_kv_bytes",
]

Convention = Literal["fastv", "swiglu", "exact"]
CONVENTIONS: tuple[str, ...] = ("fastv", "swiglu", "exact")


def _check_convention(convention: str, allowed: Iterable[str] = CONVENTIONS) -> None:
    allowed = tuple(allowed)
    if convention not in allowed:
        raise ValueError(f"unknown FLOPs convention {convention!r}; expected one of {allowed}")


def _text_config(config: Any) -> Any:
    """Return the text sub-config of a composite VLM config, or ``config`` itself."""
    sub = getattr(config, "text_config", None)
    return sub if sub is not None else config


# --------------------------------------------------------------------------------------------------
# LLM side
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMDims:
    """Decoder dimensions: L layers, width d, FFN width m, H query heads, H_kv KV heads, head dim d_h."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LLMDims.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads={self.num_heads} not divisible by num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_config(cls, text_config: Any) -> LLMDims:
        """Read a HF text config (LlamaConfig, Qwen2 text config; a composite VLM config also works).

        ``head_dim`` is taken from the config when present and not None, else ``d // H``;
        ``num_key_value_heads`` defaults to H.
        """
        cfg = _text_config(text_config)
        hidden = int(cfg.hidden_size)
        heads = int(cfg.num_attention_heads)
        kv_heads = getattr(cfg, "num_key_value_heads", None)
        head_dim = getattr(cfg, "head_dim", None)
        return cls(
            num_layers=int(cfg.num_hidden_layers),
            hidden=hidden,
            intermediate=int(cfg.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(kv_heads) if kv_heads is not None else heads,
            head_dim=int(head_dim) if head_dim is not None else hidden // heads,
        )

    @classmethod
    def preset(cls, name: str) -> LLMDims:
        """Named constants of public models (spec §2): see ``LLM_PRESETS``."""
        key = name.lower()
        if key not in LLM_PRESETS:
            raise KeyError(f"unknown LLM preset {name!r}; known: {sorted(LLM_PRESETS)}")
        return LLM_PRESETS[key]

    def kv_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """KV-cache bytes of one token over all layers: ``2·L·H_kv·d_h·bytes_per_elem``."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_elem


LLM_PRESETS: dict[str, LLMDims] = {
    "llava-1.5-7b": LLMDims(32, 4096, 11008, 32, 32, 128),
    "llava-1.5-13b": LLMDims(40, 5120, 13824, 40, 40, 128),
    "llava-next-7b": LLMDims(32, 4096, 11008, 32, 32, 128),
    "qwen2.5-vl-7b": LLMDims(28, 3584, 18944, 28, 4, 128),
    "qwen2.5-vl-3b": LLMDims(36, 2048, 11008, 16, 2, 128),
}


def layer_flops(n: float, dims: LLMDims, convention: str = "fastv") -> float:
    """FLOPs of one decoder layer on a sequence of ``n`` tokens (formulas in the module docstring)."""
    _check_convention(convention)
    d, m = dims.hidden, dims.intermediate
    if convention == "fastv":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    if convention == "swiglu":
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    h, hkv, dh = dims.num_heads, dims.num_kv_heads, dims.head_dim
    return 2 * (n * d * h * dh + 2 * n * d * hkv * dh + n * h * dh * d + 2 * n * n * h * dh + 3 * n * d * m)


def _check_len(values: Sequence[float], dims: LLMDims, what: str) -> None:
    if len(values) != dims.num_layers:
        raise ValueError(f"{what} has {len(values)} entries, expected num_layers={dims.num_layers}")


def prefill_flops(visual_per_layer: Sequence[float], n_text: float, dims: LLMDims, convention: str = "fastv") -> float:
    """Prefill FLOPs ``Σ_ℓ f(n_ℓ + n_text)``; ``visual_per_layer[ℓ]`` = visual tokens entering layer ℓ."""
    _check_len(visual_per_layer, dims, "visual_per_layer")
    _check_convention(convention)
    return math.fsum(layer_flops(n + n_text, dims, convention) for n in visual_per_layer)


def prefill_flops_all(visual_per_layer: Sequence[float], n_text: float, dims: LLMDims) -> dict[str, float]:
    """``prefill_flops`` in all three conventions: ``{"fastv": …, "swiglu": …, "exact": …}``."""
    return {c: prefill_flops(visual_per_layer, n_text, dims, c) for c in CONVENTIONS}


def decode_flops(cache_len_per_layer: Sequence[float], dims: LLMDims) -> float:
    """``exact`` FLOPs of one generated token, with ``c_ℓ`` keys attended in layer ℓ:

    ``Σ_ℓ 2·[d·H·d_h + 2·d·H_kv·d_h + H·d_h·d + 2·c_ℓ·H·d_h + 3·d·m]``.
    ``c_ℓ`` is whatever the caller counts as the cache length (visual + text + generated so far).
    """
    _check_len(cache_len_per_layer, dims, "cache_len_per_layer")
    d, m = dims.hidden, dims.intermediate
    h, hkv, dh = dims.num_heads, dims.num_kv_heads, dims.head_dim
    return math.fsum(
        2 * (d * h * dh + 2 * d * hkv * dh + h * dh * d + 2 * c * h * dh + 3 * d * m) for c in cache_len_per_layer
    )


def kv_cache_bytes(
    visual_cache_per_layer: Sequence[float], n_text: float, dims: LLMDims, bytes_per_elem: int = 2
) -> int:
    """KV-cache bytes after prefill: ``Σ_ℓ (n_ℓ^cache + n_text)·2·H_kv·d_h·bytes_per_elem``.

    ``visual_cache_per_layer[ℓ]`` = visual rows left in layer ℓ's cache. Rounded to the nearest int
    (exact for integer counts).
    """
    _check_len(visual_cache_per_layer, dims, "visual_cache_per_layer")
    per_row = 2 * dims.num_kv_heads * dims.head_dim * bytes_per_elem
    return round(math.fsum(n + n_text for n in visual_cache_per_layer) * per_row)


def visual_kv_bytes(visual_cache_per_layer: Sequence[float], dims: LLMDims, bytes_per_elem: int = 2) -> int:
    """Visual rows only (``kv_cache_bytes`` with ``n_text = 0``) = ``n̄ · kv_bytes_per_token`` (§4 column)."""
    return kv_cache_bytes(visual_cache_per_layer, 0, dims, bytes_per_elem)


def layer_avg_tokens(visual_per_layer: Sequence[float]) -> float:
    """Layer-averaged visual tokens ``n̄ = (1/L)·Σ_ℓ n_ℓ`` (input convention, §4)."""
    if len(visual_per_layer) == 0:
        raise ValueError("visual_per_layer is empty")
    return math.fsum(visual_per_layer) / len(visual_per_layer)


def retained_tokens(visual_per_layer: Sequence[float]) -> int:
    """Retained tokens K = visual tokens entering decoder layer 0 (§4)."""
    if len(visual_per_layer) == 0:
        raise ValueError("visual_per_layer is empty")
    return int(visual_per_layer[0])


def tokens_per_layer(n_visual: int, cuts: Sequence[tuple[int, int]], num_layers: int) -> list[int]:
    """Expand a stage schedule into visual tokens entering each layer.

    ``cuts`` = ``[(k, count_after), …]`` with strictly increasing ``k`` in ``[0, num_layers)``:
    from the input of layer k on, ``count_after`` visual tokens remain (``k = 0``: pre-LLM).
    Example: ``tokens_per_layer(576, [(2, 166)], 32) == [576]*2 + [166]*30`` (FastV k=2, R=166).
    Counts must not increase (physical pruning never adds rows).
    """
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if n_visual < 0:
        raise ValueError(f"n_visual must be >= 0, got {n_visual}")
    counts = [int(n_visual)] * num_layers
    prev_k, prev_count = -1, int(n_visual)
    for k, count in cuts:
        if not 0 <= k < num_layers:
            raise ValueError(f"cut layer {k} outside [0, {num_layers})")
        if k <= prev_k:
            raise ValueError(f"cut layers must be strictly increasing, got {k} after {prev_k}")
        if not 0 <= count <= prev_count:
            raise ValueError(f"count_after={count} at layer {k} must be in [0, {prev_count}]")
        counts[k:] = [int(count)] * (num_layers - k)
        prev_k, prev_count = k, int(count)
    return counts


# --------------------------------------------------------------------------------------------------
# Vision side (reported separately; `fastv` style = MACs unless convention="exact")
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionDims:
    """ViT dimensions (CLIP-style): layers, width, heads, MLP width, tokens per crop incl. [CLS].

    ``swiglu`` selects a 3-matrix MLP (default: 2-matrix GELU MLP as in CLIP); ``has_cls``,
    ``patch_size`` and ``num_channels`` are only used for the optional patch-embedding term.
    """

    num_layers: int
    hidden: int
    num_heads: int
    intermediate: int
    num_tokens: int
    swiglu: bool = False
    has_cls: bool = True
    patch_size: int = 14
    num_channels: int = 3

    @property
    def head_dim(self) -> int:
        """Per-head width ``d / H``."""
        return self.hidden // self.num_heads

    @property
    def num_patches(self) -> int:
        """Patch tokens per crop (``num_tokens`` minus the [CLS] token if any)."""
        return self.num_tokens - int(self.has_cls)

    @classmethod
    def from_config(cls, vision_config: Any, has_cls: bool | None = None) -> VisionDims:
        """Read a ``CLIPVisionConfig`` (or a composite config's ``vision_config``).

        Tokens = ``(image_size / patch_size)² + [CLS]``; [CLS] presence defaults to
        ``model_type == "clip_vision_model"`` (SigLIP-style towers have none).
        """
        sub = getattr(vision_config, "vision_config", None)
        cfg = sub if sub is not None else vision_config
        if has_cls is None:
            has_cls = getattr(cfg, "model_type", "clip_vision_model") == "clip_vision_model"
        side = int(cfg.image_size) // int(cfg.patch_size)
        return cls(
            num_layers=int(cfg.num_hidden_layers),
            hidden=int(cfg.hidden_size),
            num_heads=int(cfg.num_attention_heads),
            intermediate=int(cfg.intermediate_size),
            num_tokens=side * side + int(has_cls),
            swiglu=False,
            has_cls=has_cls,
            patch_size=int(cfg.patch_size),
            num_channels=int(getattr(cfg, "num_channels", 3)),
        )

    @classmethod
    def preset(cls, name: str) -> VisionDims:
        """``"clip-vit-l-14-336"``: 24 layers, width 1024, 16 heads, MLP 4096, 577 tokens (§2)."""
        key = name.lower()
        if key not in VISION_PRESETS:
            raise KeyError(f"unknown vision preset {name!r}; known: {sorted(VISION_PRESETS)}")
        return VISION_PRESETS[key]


VISION_PRESETS: dict[str, VisionDims] = {
    "clip-vit-l-14-336": VisionDims(24, 1024, 16, 4096, 577),
}


def vision_flops(
    dims: VisionDims, n_crops: int = 1, convention: str = "fastv", include_patch_embed: bool = False
) -> float:
    """ViT FLOPs for ``n_crops`` crops, all ``dims.num_layers`` layers, n = ``dims.num_tokens``:

    - ``fastv`` (MACs): ``L·(4·n·d² + 2·n²·d + k·n·d·m)``, k = 3 if ``swiglu`` else 2;
    - ``exact`` (2 per MAC): ``2·L·(4·n·d·H·d_h + 2·n²·H·d_h + k·n·d·m)``.

    CLIP ViT-L/14-336: 0.1906 T (``fastv``), 0.3812 T (``exact``). ``include_patch_embed`` adds the
    patch-embedding conv, ``patches·C·p²·d`` MACs per crop (excluded by default, like all embeddings).
    """
    _check_convention(convention, ("fastv", "exact"))
    n, d, m, L = dims.num_tokens, dims.hidden, dims.intermediate, dims.num_layers
    hd = dims.num_heads * dims.head_dim
    k = 3 if dims.swiglu else 2
    macs = L * (4 * n * d * hd + 2 * n * n * hd + k * n * d * m)
    if include_patch_embed:
        macs += dims.num_patches * dims.num_channels * dims.patch_size**2 * d
    scale = 2 if convention == "exact" else 1
    return float(scale * n_crops * macs)


def projector_flops(n_visual: float, in_dim: int, hidden: int, out_dim: int, convention: str = "fastv") -> float:
    """Token-wise 2-layer MLP projector: ``n·(in·hidden + hidden·out)`` MACs (×2 for ``exact``).

    LLaVA: ``576·(1024·4096 + 4096²)`` ≈ 0.012 T; LLaVA-NeXT multiplies by the crop count.
    """
    _check_convention(convention, ("fastv", "exact"))
    scale = 2 if convention == "exact" else 1
    return float(scale * n_visual * (in_dim * hidden + hidden * out_dim))


@dataclass(frozen=True)
class QwenVisionDims:
    """Qwen2.5-VL windowed ViT: blocks, width, heads, SwiGLU MLP, full-attention blocks, window (px).

    ``window_size`` is in pixels (112 px = 8×8 patches of 14 px); ``out_hidden`` is the merger output.
    """

    depth: int = 32
    hidden: int = 1280
    num_heads: int = 16
    intermediate: int = 3420
    full_attn_blocks: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 112
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    out_hidden: int = 3584

    @property
    def head_dim(self) -> int:
        """Per-head width ``d / H`` (80 for Qwen2.5-VL)."""
        return self.hidden // self.num_heads

    @classmethod
    def from_config(cls, vision_config: Any) -> QwenVisionDims:
        """Read a ``Qwen2_5_VLVisionConfig`` (or a composite config's ``vision_config``)."""
        sub = getattr(vision_config, "vision_config", None)
        cfg = sub if sub is not None else vision_config
        return cls(
            depth=int(cfg.depth),
            hidden=int(cfg.hidden_size),
            num_heads=int(cfg.num_heads),
            intermediate=int(cfg.intermediate_size),
            full_attn_blocks=tuple(int(i) for i in cfg.fullatt_block_indexes),
            window_size=int(cfg.window_size),
            patch_size=int(cfg.patch_size),
            spatial_merge_size=int(cfg.spatial_merge_size),
            temporal_patch_size=int(getattr(cfg, "temporal_patch_size", 2)),
            in_channels=int(getattr(cfg, "in_channels", 3)),
            out_hidden=int(getattr(cfg, "out_hidden_size", cfg.hidden_size)),
        )

    @classmethod
    def preset(cls, name: str) -> QwenVisionDims:
        """``"qwen2.5-vl-7b"`` (merger out 3584) or ``"qwen2.5-vl-3b"`` (merger out 2048)."""
        presets = {"qwen2.5-vl-7b": cls(out_hidden=3584), "qwen2.5-vl-3b": cls(out_hidden=2048)}
        key = name.lower()
        if key not in presets:
            raise KeyError(f"unknown Qwen vision preset {name!r}; known: {sorted(presets)}")
        return presets[key]


def _window_sides(merged_side: int, window_merged: int, merge: int) -> list[int]:
    """Patch extents of the windows along one axis (full windows from the top/left, then the rest)."""
    full, rest = divmod(merged_side, window_merged)
    sides = [window_merged * merge] * full
    if rest:
        sides.append(rest * merge)
    return sides


def qwen_vit_flops(
    grid_thw: Sequence[tuple[int, int, int]],
    dims: QwenVisionDims | None = None,
    convention: str = "fastv",
    include_merger: bool = False,
    include_patch_embed: bool = False,
) -> float:
    """Qwen2.5-VL ViT FLOPs for images/videos given as ``image_grid_thw`` rows ``(t, h, w)`` in patches.

    Per block, with n = Σ t·h·w patches and S = Σ over attention groups of (group size)²:
    ``fastv`` (MACs) ``4·n·d² + 2·S·d + 3·n·d·m``; ``exact`` = ``2·(4·n·d·H·d_h + 2·S·H·d_h + 3·n·d·m)``.

    Assumptions (mirroring transformers' ``get_vision_window_index`` / ``cu_seqlens``):
    - windowed blocks: groups are the windows of ``window_size/patch_size`` = 8×8 patches, tiled from
      the top-left of each frame over the merged grid (h/2 × w/2) in units of 4×4 merged tokens; edge
      windows are partial (padding is not computed), so S = Σ_frames (Σ_i r_i²)(Σ_j c_j²);
    - full-attention blocks (``full_attn_blocks``): one group per temporal frame, S = t·(h·w)²;
    - biases, RMSNorm, 2-D RoPE and softmax are excluded (as for the LLM);
    - ``include_merger`` adds the patch merger ``(n/4)·(D·D + D·out)`` MACs with D = 4·d = 5120;
    - ``include_patch_embed`` adds the Conv3d ``n·(C·T_p·p²)·d`` MACs (1176·1280 per patch).
    """
    _check_convention(convention, ("fastv", "exact"))
    dims = dims if dims is not None else QwenVisionDims()
    d, m, hd = dims.hidden, dims.intermediate, dims.num_heads * dims.head_dim
    merge = dims.spatial_merge_size
    window_merged = dims.window_size // merge // dims.patch_size
    n = 0
    s_window = 0
    s_full = 0
    for t, h, w in grid_thw:
        if h % merge or w % merge:
            raise ValueError(f"grid ({t}, {h}, {w}) not divisible by spatial_merge_size={merge}")
        n += t * h * w
        s_full += t * (h * w) ** 2
        rows = _window_sides(h // merge, window_merged, merge)
        cols = _window_sides(w // merge, window_merged, merge)
        s_window += t * sum(r * r for r in rows) * sum(c * c for c in cols)
    n_full = sum(1 for i in dims.full_attn_blocks if 0 <= i < dims.depth)
    n_windowed = dims.depth - n_full
    dense = 4 * n * d * hd + 3 * n * d * m
    macs = dims.depth * dense + 2 * hd * (n_full * s_full + n_windowed * s_window)
    if include_merger:
        big = d * merge * merge
        macs += (n // (merge * merge)) * (big * big + big * dims.out_hidden)
    if include_patch_embed:
        macs += n * dims.in_channels * dims.temporal_patch_size * dims.patch_size**2 * d
    scale = 2 if convention == "exact" else 1
    return float(scale * macs)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsReport:
    """Analytic cost of one prefill: LLM totals per convention (FLOPs), vision FLOPs, KV-cache bytes."""

    fastv: float
    swiglu: float
    exact: float
    vision: float = 0.0
    kv_bytes: int = 0

    @classmethod
    def compute(
        cls,
        visual_per_layer: Sequence[float],
        n_text: float,
        dims: LLMDims,
        vision: float = 0.0,
        visual_cache_per_layer: Sequence[float] | None = None,
        bytes_per_elem: int = 2,
    ) -> FlopsReport:
        """Build a report; the KV cache defaults to ``visual_per_layer`` rows per layer."""
        totals = prefill_flops_all(visual_per_layer, n_text, dims)
        cache = visual_per_layer if visual_cache_per_layer is None else visual_cache_per_layer
        return cls(
            fastv=totals["fastv"],
            swiglu=totals["swiglu"],
            exact=totals["exact"],
            vision=float(vision),
            kv_bytes=kv_cache_bytes(cache, n_text, dims, bytes_per_elem),
        )

    def as_dict(self) -> dict[str, float]:
        """Plain dict of the fields (for JSON logging)."""
        return asdict(self)
