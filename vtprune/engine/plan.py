"""`HookPlan`: which hooks a method needs on a model, decided (and validated) once at `apply`.

From the method's stages and signals and the adapter's depth and layer kinds: the position rule of each event,
the stage at each decoder layer, the layers whose input an in-LLM signal reads, the layers the method repairs,
whether vision-encoder hooks and text signals are needed. Every refusal of a method / model / position policy
combination that can be known before the first call is raised here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..contract.method import PruningMethod, Stage
from ..errors import UnsupportedInputError, VtpruneError
from ..models.base import ModelAdapter
from . import signals as sig

POSITION_POLICIES = ("keep", "reindex")


@dataclass(frozen=True, kw_only=True)
class HookPlan:
    """Where the session's hooks go and what each needs (immutable; one per session)."""

    stages: tuple[Stage, ...]
    positions: str  # the policy as given: "keep", "reindex" or one rule per stage, comma-separated
    #: position rule of the event that starts each group (layer 0 for a vision/pre_llm stage). A per-stage list
    #: decodes from layer 0's next id in every layer (as the stock model computes it); only "reindex" alone
    #: decodes each layer from its own length.
    rule_at: dict[int, str]
    before_llm: bool  # the first stage acts before the LLM (vision / pre_llm)
    stage_at_layer: dict[int, int]  # decoder layer -> index of its llm:k stage
    capture_layers: frozenset[int]  # layers whose input is kept for the in-LLM signals (k−1, and 0 if needed)
    capture_layer0: bool  # layer 0's input gives the candidates' `visual_embeddings` to an in-LLM stage
    repair_layers: tuple[int, ...]  # decoder layers whose output the method repairs (`PruningMethod.repair_layers`)
    needs_vision: bool  # some stage asks for vision-encoder signals: hooks on the vision tower
    text_wanted: frozenset[str]  # text signals any stage asks for
    needs_suffix_rows: bool  # some stage asks for a question-span signal
    kind_of: tuple  # `ModelAdapter.layer_kind` of each decoder layer
    kinds: tuple  # the distinct layer kinds, in order of first appearance

    @property
    def reindex_all(self) -> bool:
        """The policy is "reindex" alone (each layer decodes from its own length)."""
        return self.positions == "reindex"

    @property
    def first_hooked_layer(self) -> int | None:
        """The first decoder layer that needs a pre-hook (an llm:k stage or a captured input), None if none."""
        if not self.stage_at_layer:
            return None
        return min(min(self.stage_at_layer), min(self.capture_layers, default=10**9))

    def first_of_kind(self, idx: int, kind) -> int:
        """The first decoder layer at or after `idx` of `kind` (its cache sizes the mask), else `idx`."""
        return next((i for i in range(idx, len(self.kind_of)) if self.kind_of[i] == kind), idx)

    @classmethod
    def build(cls, *, model: nn.Module, adapter: ModelAdapter, method: PruningMethod, positions: str) -> HookPlan:
        """Validate the method's stages against the model and the position policy; -> the plan.

        The method must be bound (`method.bind(num_layers)`) already."""
        stages: tuple[Stage, ...] = method.stages()
        method.validate(adapter.num_layers)
        _check_stage_order(method.name, stages)
        adapter.check_stages(method.name, stages)  # a family may refuse some stage kinds (Gemma 3: llm:k)
        if method.inserts and any(s.kind == "llm" for s in stages):
            raise VtpruneError(
                f"method {method.name!r} inserts tokens before the LLM; in-LLM stages after inserted tokens are not "
                "supported by the engine"
            )
        needed = method.required_positions()
        if needed is not None and needed != positions:
            raise VtpruneError(
                f"method {method.name!r} with preset={getattr(method.config, 'preset', None)!r} reproduces reference "
                f"position ids that need positions={needed!r} (got positions={positions!r}): pass "
                f"vtprune.apply(..., positions={needed!r})"
            )
        rules = positions.split(",")  # one rule per stage ("keep"/"reindex" alone: the same rule at every stage)
        if len(rules) not in (1, len(stages)):
            raise VtpruneError(
                f"positions={positions!r} names {len(rules)} rules but method {method.name!r} has "
                f"{len(stages)} stages ({', '.join(map(str, stages))}): give one rule per stage"
            )
        rule_at = {(0 if s.before_llm else s.layer): rules[min(i, len(rules) - 1)] for i, s in enumerate(stages)}
        kind_of = tuple(adapter.layer_kind(i) for i in range(adapter.num_layers))  # see ModelAdapter.layer_kind
        stage_at_layer = {s.layer: i for i, s in enumerate(stages) if s.kind == "llm"}
        previous_layer = sig.LLM_SIGNALS - sig.OWN_LAYER_SIGNALS  # computed from layer k−1's captured input
        capture_layers = {
            s.layer - 1 for i, s in enumerate(stages) if s.kind == "llm" and method.signals(i) & previous_layer
        }
        if -1 in capture_layers:
            raise VtpruneError(
                f"method {method.name!r} acts at llm:0 with signals of layer k−1 "
                f"{sorted(method.signals(stage_at_layer[0]) & previous_layer)}; at llm:0 only the in-layer "
                f"signals {sorted(sig.OWN_LAYER_SIGNALS)} exist"
            )
        repair_layers = tuple(sorted(set(method.repair_layers())))
        if any(not 0 <= r < adapter.num_layers for r in repair_layers):
            raise VtpruneError(
                f"method {method.name!r} repairs layers {list(repair_layers)}, but the language model has "
                f"{adapter.num_layers} layers"
            )
        wanted = [method.signals(i) for i in range(len(stages))]
        missing = frozenset().union(*wanted) & (sig.VISION_SIGNALS - adapter.vision_signal_names)
        if missing:
            raise UnsupportedInputError(
                f"method {method.name!r} needs the vision signals {sorted(missing)}, which "
                f"{type(model).__name__} does not provide (see the method's options for a variant without them)"
                + getattr(adapter, "missing_signal_hint", lambda _: "")(missing)
            )
        capture_layer0 = any(s.kind == "llm" and "visual_embeddings" in wanted[i] for i, s in enumerate(stages))
        if capture_layer0:
            capture_layers.add(0)
        return cls(
            stages=stages,
            positions=positions,
            rule_at=rule_at,
            before_llm=bool(stages) and stages[0].before_llm,
            stage_at_layer=stage_at_layer,
            capture_layers=frozenset(capture_layers),
            capture_layer0=capture_layer0,
            repair_layers=repair_layers,
            needs_vision=any(w & sig.VISION_SIGNALS for w in wanted),
            text_wanted=frozenset().union(*(w & sig.TEXT_SIGNALS for w in wanted)),
            needs_suffix_rows=any(sig.SUFFIX_SIGNALS & w for w in wanted),
            kind_of=kind_of,
            kinds=tuple(dict.fromkeys(kind_of)),
        )


def check_positions(positions: object) -> None:
    """Refuse a position policy that is neither "keep"/"reindex" nor a comma-separated list of them."""
    if not isinstance(positions, str) or any(r not in POSITION_POLICIES for r in positions.split(",")):
        raise VtpruneError(
            f"positions must be one of {POSITION_POLICIES} or one of them per stage, comma-separated "
            f"(e.g. 'reindex,keep,reindex'), got {positions!r}"
        )


def _check_stage_order(name: str, stages: tuple[Stage, ...]) -> None:
    for i, s in enumerate(stages):
        if s.before_llm and i != 0:
            raise VtpruneError(f"method {name!r}: only the first stage may act before the LLM")
    layers = [s.layer for s in stages if s.kind == "llm"]
    if layers != sorted(set(layers)):
        raise VtpruneError(f"method {name!r}: in-LLM stages must be at strictly increasing layers, got {layers}")
