"""The method interface: a method scores one image's candidate tokens and returns a `KeepPlan`.

Methods never see a model. The engine hands them tensors (features, grid coordinates and the signals
they asked for) and gets back sorted keep indices, plus replacement features for merging methods.
Budgets, bypass, batching, compaction and positions are the engine's business.
"""

from __future__ import annotations

import math
import re
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch

from .errors import BudgetError, VtpruneError

StageKind = Literal["vision", "pre_llm", "llm"]


@dataclass(frozen=True)
class Stage:
    """Where a pruning event acts: `vision`, `pre_llm`, or `llm:k` (input of decoder layer k)."""

    kind: StageKind
    layer: int = 0

    @classmethod
    def parse(cls, text: str) -> Stage:
        if text in ("vision", "pre_llm"):
            return cls(text)  # type: ignore[arg-type]
        m = re.fullmatch(r"llm:(\d+)", text)
        if m is None:
            raise VtpruneError(f"stage must be 'vision', 'pre_llm' or 'llm:<layer>', got {text!r}")
        return cls("llm", int(m.group(1)))

    @property
    def before_llm(self) -> bool:
        return self.kind != "llm"

    def __str__(self) -> str:
        return f"llm:{self.layer}" if self.kind == "llm" else self.kind


@dataclass
class KeepPlan:
    """One image's decision at one stage.

    keep_idx:  (K,) int64, sorted, unique, indices into the image's *current* candidate list.
    new_feats: (K, D) or None; replaces the kept rows (merging methods). Always in the stage's feature space
               (LLM inputs before the LLM: a method that merges pre-projector features maps them with
               `ImageTokens.project`).
    weights:   (K,) or None; tokens represented by each kept row (diagnostics only).
    inserted:  (E, D) or None; extra tokens that are no candidate (e.g. VisionZip's CLIP [CLS] row), only from
               methods with `inserts = True` and only at a `vision`/`pre_llm` stage. They count towards the
               budget (K + E tokens = the scheduled count) and enter the LLM as visual tokens.
    insert_at: (E,) int64, non-decreasing candidate indices: inserted token e sits right before candidate
               `insert_at[e]` (kept or not) and shares its sequence slot and position id.
    order:     (K + E,) int64 or None: a permutation of the image's output tokens (0..K−1: the kept slots in
               `keep_idx` order, K..K+E−1: the inserted ones) emitted instead of the default order (ascending
               representative index, inserted tokens before their slot). Any stage; needs
               `positions="reindex"` (a reference order's contiguous ids).
    """

    keep_idx: torch.Tensor
    new_feats: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    inserted: torch.Tensor | None = None
    insert_at: torch.Tensor | None = None
    order: torch.Tensor | None = None

    @property
    def n_inserted(self) -> int:
        return 0 if self.inserted is None else int(self.inserted.shape[0])


@dataclass
class ImageTokens:
    """What a method sees of one image at one stage.

    features:       (n, D) projector outputs (`vision`/`pre_llm`) or hidden states at the input of the
                    stage layer (`llm:k`).
    coords:         (n, 2) int64 (row, col) of each candidate on its crop's grid.
    crop:           (n,) int64 index of the crop (grid) each candidate belongs to.
    grids:          [(h, w)] per crop, in the original (unpruned) geometry.
    original_index: (n,) int64 index of each candidate into the image's original visual tokens.
    signals:        tensors the method asked for (see `vtprune.contract.signals` for names and shapes), e.g.
                    "last_token_attention" (n,) or "question_embeddings" (T, D).
    seed:           deterministic seed of this (sample, image), independent of batch composition.
    memo:           a dict the method may fill at one stage and read at a later stage of the same image
                    (same prefill); e.g. cluster labels. Starts empty at every prefill.
    question:       the user-question text when the method asked for "question_text", else None.
    tile:           (n,) int64 vision view of each candidate when a crop holds several encoder views
                    (LLaVA-NeXT: 0 = base view, 1.. = CLIP tiles of the unpadded area), else None.
    project:        at `vision`/`pre_llm` stages of models whose adapter provides `vision_features`
                    (LLaVA families): the model's token-wise projector, (k, C) pre-projector rows -> (k, D)
                    LLM-input rows (e.g. to map features merged in vision space); None otherwise.
    """

    features: torch.Tensor
    coords: torch.Tensor
    crop: torch.Tensor
    grids: list[tuple[int, int]]
    original_index: torch.Tensor
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    memo: dict = field(default_factory=dict)
    question: str | None = None
    tile: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def view(self) -> torch.Tensor:
        """(n,) int64 vision-encoder view of each candidate: `tile` when set, else `crop` (the index of the
        per-view signals, e.g. the rows of `vision_cls_features`)."""
        return self.tile if self.tile is not None else self.crop

    def view_members(self) -> list[torch.Tensor]:
        """Candidate indices per vision-encoder view, in view order (spec §8 "per crop": LLaVA-NeXT's base
        view and each CLIP tile, each with its own [CLS]; otherwise one per crop).  -> [(n_v,) int64]."""
        ids = self.view
        return [(ids == v).nonzero().flatten() for v in torch.unique(ids).tolist()]


def option(
    default: object = None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    allow_inf: bool = False,
) -> Any:
    """A config field with declared accepted values, checked by `MethodConfig.validate_options` together with
    the field's type hint: numbers against the bounds (ge/gt/le/lt; NaN always refused, ±inf unless
    `allow_inf`), strings against `choices`."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "allow_inf": allow_inf}
    return field(default=default, metadata={"vtprune": meta})


class _Mismatch(Exception):
    pass


def _is_numpy(value: object) -> bool:
    return type(value).__module__ == "numpy"


def _coerce(value: object, hint: object) -> object:
    """`value` as the type hint asks (numpy scalars -> Python; an int where a float is wanted -> float);
    raises `_Mismatch` when it is not of that type (bool is never an int or a float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if value is None:
            if type(None) in members:
                return None
            raise _Mismatch
        ordered = sorted((m for m in members if m is not type(None)), key=lambda m: m is float)  # exact types first
        for member in ordered:
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(hint) and type(value) in {type(a) for a in typing.get_args(hint)}:
            return value
        raise _Mismatch
    if _is_numpy(value):
        import numpy as np

        if isinstance(value, np.bool_):
            value = bool(value)
        elif isinstance(value, np.integer):
            value = int(value)
        elif isinstance(value, np.floating):
            value = float(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    return value  # other hints (containers, Any): not checked here


def _describe(hint: object, meta: dict) -> str:
    """Accepted values of a field in words, e.g. "an int >= 1" or "one of ('avg', 'max')"."""
    origin = typing.get_origin(hint)
    members = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    parts = []
    ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    bounds = [f"{op} {meta[k]}" for k, op in ops if meta.get(k) is not None]
    for m in members:
        if m is type(None):
            continue
        if m is bool:
            parts.append("a bool (True or False)")
        elif m is int:
            parts.append("an int" + (" " + " and ".join(bounds) if bounds else ""))
        elif m is float:
            parts.append("a number" + (" " + " and ".join(bounds) if bounds else ""))
        elif m is str:
            parts.append(f"one of {tuple(meta['choices'])}" if meta.get("choices") else "a string")
        elif typing.get_origin(m) is typing.Literal:
            parts.append(f"one of {typing.get_args(m)}")
        else:
            parts.append(getattr(m, "__name__", str(m)))
    if type(None) in members:
        parts.append("None")
    return " or ".join(parts)


def _out_of_range(value: float, meta: dict) -> bool:
    if math.isnan(value) or (math.isinf(value) and not meta.get("allow_inf")):
        return True
    ge, gt, le, lt = (meta.get(k) for k in ("ge", "gt", "le", "lt"))
    return (
        (ge is not None and value < ge)
        or (gt is not None and value <= gt)
        or (le is not None and value > le)
        or (lt is not None and value >= lt)
    )


@dataclass(frozen=True)
class BudgetRequest:
    """The budget `vtprune.apply` was given, resolved for a model whose images have a fixed visual-token count
    (set on the method by the engine before `bind`), e.g. to pick trained weights made for that budget."""

    tokens: int  # the budget in tokens for `visual` tokens (64 for a ratio 1/9 of 576)
    visual: int  # visual tokens per image of the attached model (576 for LLaVA-1.5)
    mode: str  # "layer_avg" | "retained"


@dataclass
class MethodConfig:
    """Base class of the typed per-method option dataclasses.

    Every field is validated by `validate_options` (called when a method is built, i.e. at `vtprune.apply`)
    from its type hint plus the accepted values declared with `option(...)`; one mechanism for all methods."""

    preset: str = "default"

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate_options(self, method: str) -> None:
        """Check (and normalise: numpy scalars, ints for floats) every option; raise `VtpruneError` naming the
        option, its value and the accepted values."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            hint = hints.get(f.name, Any)
            meta = f.metadata.get("vtprune", {})
            accepted = _describe(hint, meta)
            try:
                value = _coerce(value, hint)
            except _Mismatch:
                raise VtpruneError(
                    f"method {method!r} option {f.name}={value!r} ({type(value).__name__}): expected {accepted}"
                ) from None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if _out_of_range(value, meta):
                    raise VtpruneError(f"method {method!r} option {f.name}={value!r}: expected {accepted}")
            elif isinstance(value, str) and meta.get("choices") and value not in meta["choices"]:
                raise VtpruneError(f"method {method!r} option {f.name}={value!r}: expected {accepted}")
            setattr(self, f.name, value)


class PruningMethod(ABC):
    """Base class: a registered name, a config class, stages, signals and a `select` per image."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: True when `select` returns `new_feats` (not equivalent to masking).
    merges: ClassVar[bool] = False
    #: False when the realised count may differ from the scheduled one (e.g. pooling).
    exact_count: ClassVar[bool] = True
    #: True when `select` may return `KeepPlan.inserted` tokens (pre-LLM methods only: the engine refuses
    #: an in-LLM stage in a method that inserts).
    inserts: ClassVar[bool] = False
    #: True when `select` decides how many tokens to keep (input-adaptive, e.g. RCP's trained pruner): the engine
    #: calls `select` at every stage of every image it prunes (budget < n) whatever the scheduled counts, and `k`
    #: is only the schedule's nominal value. Pair with `exact_count = False`.
    adaptive_count: ClassVar[bool] = False
    presets: ClassVar[tuple[str, ...]] = ("default",)

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise VtpruneError(
                f"method {self.name!r} takes a {self.config_class.__name__}, got {type(self.config).__name__}"
            )
        self.config.validate_options(self.name)
        if self.config.preset not in self.presets:
            raise VtpruneError(
                f"method {self.name!r} has no preset {self.config.preset!r}; choose one of {self.presets}"
            )
        #: decoder depth of the model this method is attached to (set by `bind`; None before).
        self.num_layers: int | None = None
        #: signal names the attached model can provide (set by the engine before `bind`; None before):
        #: lets a method pick its model-specific variant by capability, never by model name.
        self.available_signals: frozenset[str] | None = None
        #: `name_or_path` of the attached model (set by the engine before `bind`), e.g. to look up a shipped
        #: calibration; never used to branch on a model family.
        self.model_name: str | None = None
        #: {"model_class", "hidden_size", "num_layers"} of the attached model (set by the engine before `bind`;
        #: None before), e.g. to check that trained weights fit the model without importing any model code.
        self.model_signature: dict | None = None
        #: the requested budget for the attached model's fixed visual-token count (set by the engine before
        #: `bind`; None before, and for models whose count varies per image), e.g. to pick a shipped checkpoint.
        self.budget_request: BudgetRequest | None = None

    def bind(self, num_layers: int) -> None:
        """Called once by the engine before `stages()`: methods whose layers depend on the model depth
        (e.g. a cut at 22/32 of the depth) resolve them here. Default: remember the depth."""
        self.num_layers = num_layers

    @abstractmethod
    def stages(self) -> tuple[Stage, ...]:
        """The pruning events of this method, in forward order."""

    def signals(self, stage_index: int) -> frozenset[str]:
        """Names of the signals `select` needs at this stage (see `vtprune.contract.signals`)."""
        return frozenset()

    def required_positions(self) -> str | None:
        """The position policy this configuration needs (`vtprune.apply(positions=...)`), or None for any;
        e.g. "reindex" for a reference output order (`KeepPlan.order`). Checked when the method is attached."""
        return None

    def validate(self, num_layers: int) -> None:
        """Check the config against the model depth; raise `VtpruneError` naming the problem."""
        for stage in self.stages():
            if stage.kind == "llm" and not 0 < stage.layer < num_layers:
                raise VtpruneError(
                    f"method {self.name!r} acts at {stage}, but the language model has {num_layers} layers "
                    f"(valid: llm:1 .. llm:{num_layers - 1})"
                )

    def schedule(self, n: int, budget: int, mode: str, num_layers: int) -> list[int]:
        """Visual tokens kept after each stage for one image of `n` tokens and a budget in tokens.

        The default serves one-stage methods: pre-LLM keeps `budget`; an in-LLM cut at layer k keeps
        `R = round((L·B − k·N)/(L − k))` in `layer_avg` mode (spec README §4) and `budget` in `retained`.
        """
        (stage,) = self.stages()
        if stage.before_llm or mode == "retained":
            return [min(budget, n)]
        return [one_cut_keep(n, budget, stage.layer, num_layers)]

    @abstractmethod
    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        """Choose `k` of `image.n` candidates (k < n is guaranteed)."""

    def select_batch(self, stage_index: int, images: list[ImageTokens], ks: list[int]) -> list[KeepPlan]:
        """Plans for several images of one forward at the same stage (the HF engine calls this; the vLLM plugin,
        which prunes each image as vLLM encodes it, calls `select`).

        images / ks: the images the stage prunes (each k < its n) -> one plan per image, in order. The default
        calls `select` per image. A method overrides it only to score the images together (one loop for the
        batch where per-image loops would be launch-bound on an accelerator); the plans must be the ones
        `select` would give for each image alone (tests/test_select_batch.py checks every override)."""
        return [self.select(stage_index, image, k) for image, k in zip(images, ks, strict=True)]

    def repair_layers(self) -> tuple[int, ...]:
        """Decoder layers whose *output* the method rewrites at generation positions (`repair`); default none."""
        return ()

    def repair(self, layer: int, x: torch.Tensor, memos: list[dict]) -> torch.Tensor | None:
        """Rewrite one sample's generation rows of decoder layer `layer`'s output.

        x (R, D): the rows (prefill: the last prompt row; decode: each new row); memos: the `ImageTokens.memo`
        of each of the sample's images (filled by `select` during the prefill).  -> (R, D), or None to leave
        the rows as they are. Every other row of the layer output is left bit-identical by the engine."""
        raise NotImplementedError(f"method {self.name!r} names repair layers but implements no repair")


def one_cut_keep(n: int, budget: int, k: int, num_layers: int) -> int:
    """Tokens kept after a single cut at layer k so that n̄ matches `budget` (round half up).

    Raises `BudgetError` naming the smallest feasible budget when not even one token can be kept.
    """
    if budget >= n:
        return n
    r = math.floor((num_layers * budget - k * n) / (num_layers - k) + 0.5)
    if r < 1:
        smallest = math.ceil((k * n + 0.5 * (num_layers - k)) / num_layers)
        raise BudgetError(
            f"a layer-averaged budget of {budget} is infeasible for a cut at layer {k} of {num_layers} with "
            f"{n} visual tokens; the smallest feasible budget is {smallest} (or use budget_mode='retained')"
        )
    return r


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties to the lower index, returned sorted ascending.  (n,) -> (k,)"""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values
