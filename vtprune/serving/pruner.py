"""The serving-side pruner: vtprune's pre-LLM selection on one image's encoder output, without any engine.

vLLM sizes every prompt (K placeholders per image) before the vision encoder runs and shares one block table
across all decoder layers, so only methods with one `vision`/`pre_llm` stage, a count fixed before encoding and
no question-text signal can serve there. `ServingPruner` checks that at start-up, computes K per image, builds
the same `ImageTokens` the HF engine builds and calls the *registered method's own* `select` (there is no second
implementation of any method here); it then lays the plan's tokens out as the HF engine does
(`positions="reindex"`: vLLM numbers the kept placeholders contiguously).

Nothing in this module imports vLLM; `vtprune.serving.llava` and `vtprune.serving.qwen2_5_vl` wire it into
vLLM's LLaVA and Qwen2.5-VL models (the latter also needs each kept token's grid position: `layout_sources`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..budget import Budget
from ..contract.method import ImageTokens, KeepPlan, PruningMethod
from ..engine import signals as sig
from ..errors import BudgetError, UnsupportedInputError, VtpruneError
from ..registry import build_method, method_class

#: The keys accepted in the `vtprune` section of the model config (`hf_overrides={"vtprune": {...}}`).
CONFIG_KEYS = ("method", "budget", "options", "record")

#: Methods whose question-text input can be switched off, with the options that do it and why. The plugin sets
#: these options itself (a conflicting user value is refused) and hands the method an *empty* question.
TEXT_FREE_OPTIONS: dict[str, tuple[dict, str]] = {
    "dcp_prune": (
        {"tau_kappa": math.inf},
        "ACGR path only (tau_kappa = inf): the text-aware TATCS branch needs the question",
    ),
    "cdpruner": (
        {"relevance": "llm"},
        "relevance from an empty question (r = 1 for every token): the question text is not available",
    ),
    "resprune": ({"alpha": 0.0}, "alpha = 0 (no noun relevance): the question's nouns are not available"),
}

#: Why vLLM cannot run what the plugin refuses (shown in the start-up error).
WHY_NO_TEXT = "vLLM sizes each prompt (K placeholders per image) and runs the vision encoder without the prompt's text"
WHY_NO_LLM = (
    "vLLM v1 fixes the prompt length before the LLM runs and shares one KV block table across all decoder "
    "layers, so tokens cannot be removed inside the LLM"
)


@dataclass(frozen=True)
class ServingConfig:
    """The parsed `vtprune` config section: method name, budget (int tokens or ratio), options, record path."""

    method: str
    budget: int | float
    options: dict = field(default_factory=dict)
    record: str | None = None

    @classmethod
    def parse(cls, section: object) -> ServingConfig:
        """From the dict set by `hf_overrides={"vtprune": {...}}` (or a `"vtprune"` key in config.json)."""
        if isinstance(section, str):
            try:
                section = json.loads(section)
            except json.JSONDecodeError as err:
                raise VtpruneError(f"the vtprune config must be a JSON object, got {section!r}") from err
        if not isinstance(section, Mapping):
            raise VtpruneError(
                f"the vtprune config must be a dict with keys {list(CONFIG_KEYS)}, got {type(section).__name__}"
            )
        unknown = sorted(set(section) - set(CONFIG_KEYS))
        if unknown:
            raise VtpruneError(f"unknown vtprune config key(s) {unknown}; accepted: {list(CONFIG_KEYS)}")
        if "method" not in section or "budget" not in section:
            raise VtpruneError(
                'the vtprune config needs "method" and "budget", e.g. {"method": "divprune", "budget": 64}'
            )
        options = section.get("options") or {}
        if not isinstance(options, Mapping):
            raise VtpruneError(f'vtprune "options" must be a dict of method options, got {options!r}')
        record = section.get("record")
        if record is not None and not isinstance(record, str):
            raise VtpruneError(f'vtprune "record" must be a file path (str), got {record!r}')
        return cls(str(section["method"]), section["budget"], dict(options), record)


def config_section(hf_config) -> object | None:
    """The raw `vtprune` section of a (vLLM-loaded) HF config, or None when pruning is off."""
    section = getattr(hf_config, "vtprune", None)
    return None if section in (None, {}, "") else section


class ServingPruner:
    """One method + budget, checked for serving; selects per image with the method's own `select`.

    vision_signals: names of the vision signals the serving model computes (see `vtprune.engine.signals`).
    model_signature: {"model_class", "hidden_size", "num_layers"} as the HF engine sets it.
    """

    def __init__(
        self,
        config: ServingConfig,
        *,
        vision_signals: frozenset[str],
        num_layers: int,
        hidden_size: int,
        model_class: str,
        model_name: str | None = None,
    ):
        self.config = config
        self.budget = Budget.parse(config.budget, "retained")
        options = dict(config.options)
        self.text_free_note: str | None = None
        forced = TEXT_FREE_OPTIONS.get(_canonical(config.method))
        if forced is not None:
            for key, value in forced[0].items():
                if key in options and options[key] != value:
                    raise VtpruneError(
                        f"vtprune serving runs {config.method!r} without the question text ({forced[1]}); "
                        f"option {key}={options[key]!r} is not available there (omit it or pass {value!r})"
                    )
                options[key] = value
            self.text_free_note = forced[1]
        cls = method_class(config.method)  # class-level refusals first (before e.g. a checkpoint is loaded)
        if cls.adaptive_count:
            raise UnsupportedInputError(
                f"vtprune serving cannot run {cls.name!r}: it decides its token count per input and prunes inside "
                f"the LLM, but vLLM must know K per image before encoding ({WHY_NO_LLM})"
            )
        method = build_method(config.method, options)
        self.method: PruningMethod = method
        self.vision_signals = frozenset(vision_signals)
        method.available_signals = self.vision_signals | (sig.TEXT_SIGNALS if forced is not None else frozenset())
        method.model_name = model_name
        method.model_signature = {"model_class": model_class, "hidden_size": hidden_size, "num_layers": num_layers}
        method.bind(num_layers)
        stages = method.stages()
        method.validate(num_layers)
        name = method.name
        self.record = config.record
        self._counts: dict[tuple, int] = {}
        #: True for a method without stages (`none`): every image keeps its N rows, as in stock vLLM
        self.passthrough = not stages
        self.wanted: frozenset[str] = frozenset()
        if self.passthrough:
            return
        if len(stages) != 1 or not stages[0].before_llm:
            raise UnsupportedInputError(
                f"vtprune serving cannot run {name!r}: it acts at {[str(s) for s in stages]}, but only one "
                f"vision/pre_llm stage can run in vLLM ({WHY_NO_LLM})"
            )
        if method.repair_layers():
            raise UnsupportedInputError(f"vtprune serving cannot run {name!r}: it rewrites decoder layers")
        wanted = method.signals(0)
        text = wanted & sig.TEXT_SIGNALS
        if text and forced is None:
            raise UnsupportedInputError(
                f"vtprune serving cannot run {name!r}: it needs the question text (signals {sorted(text)}), but "
                f"{WHY_NO_TEXT}"
            )
        missing = wanted - sig.TEXT_SIGNALS - self.vision_signals
        if missing:
            raise UnsupportedInputError(
                f"vtprune serving cannot run {name!r}: it needs the signals {sorted(missing)}, which the served "
                f"model does not provide (vision signals there: {sorted(self.vision_signals)}; {WHY_NO_LLM})"
            )
        self.wanted = wanted

    # --- counts -----------------------------------------------------------------------------------------
    def tokens_for(self, grids: list[tuple[int, int]], hidden_size: int) -> int:
        """Tokens one image of these crop grids enters the LLM with (K, or n when the budget bypasses it).

        Exact-count methods keep the scheduled count; the others (e.g. `pool`) are probed once per geometry on
        zero features (their count may depend only on the geometry: `select` checks it at run time)."""
        key = tuple(grids)
        if key in self._counts:
            return self._counts[key]
        n = sum(h * w for h, w in grids)
        k = self.budget.tokens_for(n)
        if k >= n or self.passthrough:
            count = n
        else:
            (count,) = self.method.schedule(n, k, "retained", int(self.method.num_layers or 0))
            if count < n and not self.method.exact_count:
                probe = self._view(torch.zeros(n, hidden_size), grids, {}, 0)
                count = self._plan_count(self.method.select(0, probe, count))
        if count < 1:
            raise BudgetError(f"vtprune serving: the budget {self.budget.value!r} keeps no token of {n}")
        self._counts[key] = count
        return count

    @staticmethod
    def _plan_count(plan: KeepPlan) -> int:
        return int(plan.keep_idx.numel()) + plan.n_inserted

    # --- selection --------------------------------------------------------------------------------------
    def _view(self, features, grids, signals, seed, project=None) -> ImageTokens:
        coords, crop, offset = [], [], 0
        for c, (h, w) in enumerate(grids):
            r = torch.arange(h * w, device=features.device)
            coords.append(torch.stack([r // w, r % w], dim=1))
            crop.append(torch.full((h * w,), c, dtype=torch.long, device=features.device))
            offset += h * w
        n = features.shape[0]
        if n != offset:
            raise UnsupportedInputError(f"an image has {n} visual tokens, its grids {grids} hold {offset}")
        return ImageTokens(
            features,
            torch.cat(coords),
            torch.cat(crop),
            list(grids),
            torch.arange(n, device=features.device),
            signals,
            seed,
            {},
            None,
            None,
            project,
        )

    def prune_image(
        self,
        features: torch.Tensor,
        grids: list[tuple[int, int]],
        signals: dict[str, torch.Tensor],
        seed: int,
        project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, KeepPlan | None]:
        """One image: features (n, D) LLM inputs -> (K, D) rows in LLM order, and the plan (None: bypassed).

        signals: the vision signals in `self.wanted` for this image, e.g. cls_attention (n,)."""
        n = int(features.shape[0])
        k = self.tokens_for(grids, int(features.shape[1]))
        if k >= n:
            return features, None
        given = dict(signals)
        for name in self.wanted & sig.TEXT_SIGNALS:  # text-free variants: an empty question
            given[name] = features.new_zeros(0, features.shape[1], dtype=torch.float32)
        view = self._view(features, grids, given, seed, project)
        (scheduled,) = self.method.schedule(n, self.budget.tokens_for(n), "retained", int(self.method.num_layers))
        with torch.no_grad():
            plan = self.method.select(0, view, scheduled)
        tokens = layout_tokens(self.method.name, plan, features, n)
        if tokens.shape[0] != k:
            raise VtpruneError(
                f"{self.method.name}: kept {tokens.shape[0]} tokens of an image, but vLLM reserved {k} placeholders "
                "(its count must depend only on the image geometry to be served)"
            )
        if self.record:
            self._write_record(seed, n, plan)
        return tokens, plan

    def _write_record(self, seed: int, n: int, plan: KeepPlan) -> None:
        line = {
            "method": self.method.name,
            "seed": seed,
            "n": n,
            "keep_idx": plan.keep_idx.tolist(),
            "inserted": plan.n_inserted,
        }
        with open(self.record, "a") as fh:  # noqa: PTH123 - one short append per image
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def layout_tokens(name: str, plan: KeepPlan, visual: torch.Tensor, n: int) -> torch.Tensor:
    """A plan's output rows in the order the HF engine feeds them to the LLM under `positions="reindex"`.

    visual (n, D) -> (K + E, D): kept rows (or their `new_feats`), inserted tokens placed before their slot
    (inserted first at a shared slot), or the plan's `order` when it gives one."""
    idx = plan.keep_idx
    if idx.dim() != 1 or idx.dtype != torch.long or (idx.numel() and (idx[0] < 0 or idx[-1] >= n)):
        raise VtpruneError(f"{name}: keep_idx must be a 1-D int64 tensor of indices in [0, {n})")
    if idx.numel() > 1 and bool((idx[1:] <= idx[:-1]).any()):
        raise VtpruneError(f"{name}: keep_idx must be sorted and unique")
    tokens = plan.new_feats.to(visual.dtype) if plan.new_feats is not None else visual[idx]
    if plan.n_inserted:
        tokens = torch.cat([tokens, plan.inserted.to(visual.dtype)])
    order = _layout_order(plan)
    return tokens if order is None else tokens[order.to(tokens.device)]


def layout_sources(plan: KeepPlan) -> torch.Tensor:
    """The candidate behind each output token of `layout_tokens`, (K + E,) int64: a kept row's index, or for an
    inserted token the candidate it sits before (whose position id it shares, as in the HF engine)."""
    src = plan.keep_idx
    if plan.n_inserted:
        src = torch.cat([src, plan.insert_at.to(src.device)])
    order = _layout_order(plan)
    return src if order is None else src[order.to(src.device)]


def layout_rows(plan: KeepPlan, rows: torch.Tensor) -> torch.Tensor:
    """Per-candidate extra rows (e.g. Qwen3-VL's DeepStack levels) laid out like `layout_tokens`: (n, C) ->
    (K + E, C), a kept token's own row (merged tokens: their representative's), zeros for inserted tokens."""
    out = rows[plan.keep_idx.to(rows.device)]
    if plan.n_inserted:
        out = torch.cat([out, out.new_zeros(plan.n_inserted, rows.shape[1])])
    order = _layout_order(plan)
    return out if order is None else out[order.to(out.device)]


def _layout_order(plan: KeepPlan) -> torch.Tensor | None:
    """The permutation of [kept..., inserted...] tokens into LLM order, or None for the kept order."""
    if plan.order is not None:
        return plan.order
    if plan.n_inserted:
        idx = plan.keep_idx
        slot = torch.cat([idx * 2 + 1, plan.insert_at.to(idx.device) * 2])
        return torch.sort(slot, stable=True).indices
    return None


def pixel_seed(pixels: torch.Tensor) -> int:
    """A per-image seed from its pixel values (the HF engine seeds from the prompt ids, which vLLM's encoder
    does not see): the same image gives the same draw in any batch.  pixels (3, H, W) -> int in [0, 2**62)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % (2**62)


def _canonical(name: str) -> str:
    try:
        return method_class(name).name
    except VtpruneError:
        return name
