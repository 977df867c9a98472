"""RCP (Representation Consistency Pruner) inference: a trained checkpoint's pruners and Delayed Repair Adapters
on the engine's physical route (spec rcp.md §D; training and checkpoints: `vtprune.rcp`, docs/rcp.md).

`vtprune.apply(model, "rcp", budget, checkpoint=DIR)` (built-in models have shipped checkpoints, used when
`checkpoint` is not given: the one trained for the requested budget, `vtprune.shipped.shipped_rcp_dirs`):

- stages `llm:ℓ` at the checkpoint's pruning layers (`ℓ = 0` allowed: the decision reads layer ℓ's own input);
  at each, per image (one image per sample), `RCPPlugins.prune_step` runs on N-slot tensors built from the
  engine's in-layer signals: q2v = row mean of `layer_suffix_attention` (the question span's head-mean attention
  at layer ℓ over the current candidates, zeros at dropped slots), V = `layer_normed_features`, the question =
  `layer_normed_suffix` (mean inside the pruner). The inference mask `z + δ > 0` (θ = 0.5) is cumulative and
  never empty; the kept candidates are the slots with c = 1. `image.memo` carries, keyed by original index,
  c (N,), the rows stored at drop time (N, D), the table positions (N, 2) and the context (e_mask, e_pruned)
  of every pruning layer so far;
- repair: the engine's repair hook calls `repair(r, x, memos)` after each repair layer r on the generation
  rows (the last prompt row at prefill, every new token when decoding) with the context of the source pruning
  layer (`source_map`); every other row is left bit-identical;
- the kept count is input-adaptive (`exact_count = False`, `adaptive_count = True`): `schedule` returns the
  budget as a nominal count at every stage; the engine runs `select` at every stage of every pruned image;
- caches are untrimmed (each layer keeps exactly the rows it processed: equals the mask route, property 8).
  `trim_earlier_caches=True` (the authors' deployed variant) is refused: the engine never rewrites the cache of
  a layer that already ran.

Budget rule (Our decision): the checkpoint was trained for one budget. The budget given to `apply` must be
`layer_avg` and give the checkpoint's token count on each image, i.e. K = max(1, ⌊ρ·N + 0.5⌋) with the
checkpoint's ρ (a ratio budget equal to ρ, or a token budget equal to ρ·N on LLaVA-1.5's 576 tokens), or equal
the checkpoint's token budget (e.g. LLaVA-NeXT's 320 of 2880); otherwise `BudgetError` naming both. A budget
≥ N bypasses (no pruning and no repair: the stock model exactly). The δ of the checkpoint (calibration) is used
unless `delta` is given; `tau_eval` / `theta` likewise.

The checkpoint's architecture (model class, LLM hidden size, decoder depth) is checked against the attached
model when the engine binds the method (`UnsupportedModelError` naming both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..budget import Budget
from ..contract.method import BudgetRequest
from ..errors import BudgetError, UnsupportedInputError, UnsupportedModelError, VtpruneError
from ..rcp.checkpoint import WEIGHTS_NAME, load_plugins, read_config
from ..rcp.modules import RCPPlugins, table_coords
from ..rcp.placement import placement_for
from ..shipped import RCP_ASSETS as SHIPPED
from ..shipped import shipped_rcp_dir, shipped_rcp_dirs
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option

SIGNALS = frozenset({"layer_suffix_attention", "layer_normed_features", "layer_normed_suffix"})


@dataclass
class RCPConfig(MethodConfig):
    #: directory holding `rcp_plugins.safetensors` + `rcp_config.json` (`vtprune train-rcp --out DIR`); None:
    #: the checkpoint shipped for a built-in model (`vtprune/assets/rcp/<NAME>/`), else an error at apply.
    checkpoint: str | None = option(None)
    #: logit offset δ of the inference mask; None: the checkpoint's calibrated δ.
    delta: float | None = option(None, allow_inf=True)  # +inf: keep every token (spec property 2)
    #: mask threshold θ on σ((z + δ)/τ_eval); None: the checkpoint's (0.5: the mask is z + δ > 0).
    theta: float | None = option(None, gt=0.0, lt=1.0)
    #: τ_eval; None: the checkpoint's (irrelevant at θ = 0.5).
    tau_eval: float | None = option(None, gt=0.0)
    #: the authors' deployed variant that also deletes dropped rows from earlier layers' caches: not supported.
    trim_earlier_caches: bool = option(False)


def shipped_checkpoint(model_name: str | None) -> Path | None:
    """The first checkpoint shipped for a built-in model (`builtin:NAME` or its directory), else None."""
    return shipped_rcp_dir(model_name, WEIGHTS_NAME)


def shipped_checkpoints(model_name: str | None) -> list[Path]:
    """Every checkpoint shipped for a built-in model, the first one first (one per trained budget); [] if none."""
    return shipped_rcp_dirs(model_name, WEIGHTS_NAME)


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


def _ratio_tokens(rho: float, n: int) -> int:
    """The token count a ratio budget ρ gives on an image of n visual tokens (`Budget.tokens_for`)."""
    return Budget(value=float(rho)).tokens_for(n)


def serves(cfg: dict, tokens: int, n: int, mode: str) -> bool:
    """True when a checkpoint trained with config `cfg` serves a budget of `tokens` for `n` visual tokens (the
    budget rule of the module docstring)."""
    return mode == "layer_avg" and tokens in (_ratio_tokens(cfg["rho"], n), _round_half_up(float(cfg["budget"])))


def _pick_shipped(configs: list[tuple[Path, dict]], request: BudgetRequest | None) -> Path:
    """Of the shipped checkpoints (directory, config), the one trained for the requested budget, else the first
    one (its budget check then names what is shipped)."""
    if request is not None and request.tokens < request.visual:
        for d, cfg in configs:
            if serves(cfg, request.tokens, request.visual, request.mode):
                return d
    return configs[0][0]


def _check_reachable(budget: int, n: int, mode: str, num_layers: int) -> None:
    """`BudgetError` when no RCP checkpoint could serve a layer-averaged `budget` of `n` tokens on a
    `num_layers`-layer decoder: below the smallest count its placement for that ratio reaches (every pruner keeps
    at least one token), the same rule as `vtprune train-rcp`'s."""
    if mode != "layer_avg":
        return
    placement = placement_for(num_layers, budget / n)
    low = math.ceil(placement.min_layer_average_tokens(n) - 1e-9)
    if budget < low:
        raise BudgetError(
            f"a layer-averaged budget of {budget} of {n} visual tokens is below the smallest RCP can reach on this "
            f"{num_layers}-layer decoder: {low} tokens (the first pruning layer {placement.pruning_layers[0]} sees "
            f"all {n}, each later layer at least one); no checkpoint can be trained for it"
        )


@register
class RCP(PruningMethod):
    """Trained cross-attention pruners at three layers + Delayed Repair Adapters (physical route)."""

    name = "rcp"
    config_class = RCPConfig
    exact_count = False
    adaptive_count = True

    def __init__(self, config: RCPConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.trim_earlier_caches:
            raise VtpruneError(
                "rcp trim_earlier_caches=True is not supported: the engine keeps each layer's cache as that layer "
                "processed it (the spec's default, equal to the training route); use trim_earlier_caches=False"
            )
        self.checkpoint = c.checkpoint
        #: how messages name the checkpoint: its directory, or "shipped for builtin:NAME" (no machine path)
        self.checkpoint_label = c.checkpoint
        #: layer-averaged token budgets of the checkpoints shipped for the attached built-in model (set by `bind`)
        self.shipped_budgets: list[int] = []
        if c.checkpoint is not None:
            self._load(Path(c.checkpoint))

    def _load(self, path: Path) -> None:
        c = self.config
        self.plugins: RCPPlugins
        self.plugins, self.checkpoint_config = load_plugins(path)  # validated: one-line errors naming the file
        self.plugins.eval().requires_grad_(False)
        cfg = self.checkpoint_config
        self.delta = float(cfg.get("delta", 0.0) if c.delta is None else c.delta)
        self.theta = float(cfg.get("theta", 0.5) if c.theta is None else c.theta)
        self.tau_eval = float(cfg.get("tau_eval", 0.2) if c.tau_eval is None else c.tau_eval)
        self.placement = self.plugins.placement
        self.source = self.placement.source_map
        self.rho = float(cfg["rho"])
        self.budget_tokens = float(cfg["budget"])

    # --- attachment -------------------------------------------------------------------------------
    def bind(self, num_layers: int) -> None:
        super().bind(num_layers)
        if self.checkpoint is None:  # a model shipped with vtprune may come with trained checkpoints
            dirs = shipped_checkpoints(self.model_name)
            if not dirs:
                raise VtpruneError(
                    "rcp needs a trained checkpoint: vtprune.apply(model, 'rcp', budget, checkpoint=DIR) with DIR "
                    "made by `vtprune train-rcp --out DIR` (rcp_plugins.safetensors + rcp_config.json)"
                )
            configs = [(d, read_config(d)) for d in dirs]
            shipped = _pick_shipped(configs, self.budget_request)
            rel = shipped.relative_to(SHIPPED).as_posix()
            self.checkpoint = str(shipped)
            self.checkpoint_label = f"shipped for builtin:{rel.split('/')[0]} (vtprune/assets/rcp/{rel})"
            self.shipped_budgets = sorted({_round_half_up(float(cfg["budget"])) for _, cfg in configs})
            self._load(shipped)
        cfg = self.checkpoint_config
        want = {k: cfg.get(k) for k in ("model_class", "hidden_size", "num_layers")}
        have = self.model_signature or {"num_layers": num_layers}
        have = {k: have.get(k, want[k]) for k in want}
        if have != want:
            names = {"model_class": "model class", "hidden_size": "hidden size", "num_layers": "decoder layers"}
            diff = "; ".join(
                f"checkpoint {names[k]} {want[k]}, this model {names[k]} {have[k]}" for k in want if have[k] != want[k]
            )
            raise UnsupportedModelError(
                f"RCP checkpoint {self.checkpoint_label} was trained for {want['model_class']}, which differs from "
                f"this model in {diff}; train RCP for this model with `vtprune train-rcp`"
            )

    def stages(self) -> tuple[Stage, ...]:
        if self.checkpoint is None:
            raise VtpruneError("rcp: the stages come from the checkpoint (pass checkpoint=DIR, or attach the method)")
        return tuple(Stage("llm", ell) for ell in self.placement.pruning_layers)

    def validate(self, num_layers: int) -> None:  # llm:0 is allowed: the decision reads layer 0's own input
        for ell in self.placement.pruning_layers:
            if not 0 <= ell < num_layers:
                raise VtpruneError(f"rcp pruning layer {ell} lies outside the model's {num_layers} layers")

    def signals(self, stage_index: int) -> frozenset[str]:
        return SIGNALS

    def repair_layers(self) -> tuple[int, ...]:
        return tuple(self.placement.repair_layers)

    # --- budget -----------------------------------------------------------------------------------
    def schedule(self, n: int, budget: int, mode: str, num_layers: int) -> list[int]:
        """Nominal counts (the pruners decide the real ones); checks the budget against the checkpoint's."""
        if budget >= n:
            return [n] * len(self.placement.pruning_layers)
        if not serves(self.checkpoint_config, budget, n, mode):
            _check_reachable(budget, n, mode, num_layers)
            mine = _ratio_tokens(self.rho, n)
            shipped = ", ".join(map(str, self.shipped_budgets))
            also = f"; this model has shipped checkpoints for {shipped} tokens" if len(self.shipped_budgets) > 1 else ""
            raise BudgetError(
                f"the RCP checkpoint {self.checkpoint_label} was trained for a layer-averaged budget of "
                f"{self.budget_tokens:g} tokens (ρ = {self.rho:.4g}: {mine} of this image's {n} tokens), but the "
                f"requested budget gives {budget} tokens ({mode}); pass the checkpoint's budget (e.g. {self.rho:.6g} "
                f"or its token count) or train a checkpoint for this budget{also}"
            )
        return [budget] * len(self.placement.pruning_layers)

    # --- pruning ----------------------------------------------------------------------------------
    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        memo, plugins = image.memo, self.plugins
        layer = self.placement.pruning_layers[stage_index]
        feats = image.signals["layer_normed_features"]  # (n, D) fp32
        device = feats.device
        if next(plugins.parameters()).device != device:
            plugins.to(device)
        oi = image.original_index.to(device)
        if "rcp_c" not in memo:  # first pruning layer: every original candidate is present, in order
            if stage_index != 0 or not torch.equal(oi, torch.arange(image.n, device=device)):
                raise UnsupportedInputError("rcp: the first pruning layer must see all of the image's tokens")
            if feats.shape[1] != plugins.hidden_size:
                raise UnsupportedModelError(
                    f"RCP checkpoint {self.checkpoint_label} has hidden size {plugins.hidden_size}, the model's "
                    f"hidden states have {feats.shape[1]}"
                )
            memo["rcp_c"] = torch.ones(image.n, device=device)
            memo["rcp_vdrop"] = torch.zeros(image.n, feats.shape[1], device=device)
            memo["rcp_pos"] = table_coords(image.coords, image.crop, image.grids, int(plugins.dims["grid"])).to(device)
            memo["rcp_ctx"] = {}
        c = memo["rcp_c"]
        N = c.shape[0]
        q2v = torch.zeros(N, device=device)
        q2v[oi] = image.signals["layer_suffix_attention"].float().mean(0)  # row mean over the question span
        V = torch.zeros(N, feats.shape[1], device=device)
        V[oi] = feats.float()
        Hq = image.signals["layer_normed_suffix"].float()[None]  # (1, T_s, D)
        q_valid = torch.ones(Hq.shape[:2], dtype=torch.bool, device=device)
        with torch.no_grad():
            out = plugins.prune_step(
                layer,
                q2v[None],
                V[None],
                Hq,
                q_valid,
                c[None],
                memo["rcp_vdrop"][None],
                memo["rcp_pos"][None],
                train=False,
                delta=self.delta,
                tau_eval=self.tau_eval,
                theta=self.theta,
            )
        memo["rcp_c"], memo["rcp_vdrop"] = out.c[0], out.vdrop[0]
        memo["rcp_ctx"] = {**memo["rcp_ctx"], layer: (out.e_mask[0], out.e_pruned[0])}  # a new dict: snapshot-safe
        memo.setdefault("rcp_z", {})[layer] = out.z[0]
        keep = (out.c[0][oi] > 0.5).nonzero().flatten()
        return KeepPlan(keep)

    def repair(self, layer: int, x: torch.Tensor, memos: list[dict]) -> torch.Tensor | None:
        """DRA `layer` on one sample's generation rows x (R, D) with the context of its source pruning layer."""
        if len(memos) != 1:
            raise UnsupportedInputError(f"rcp supports one image per sample, got {len(memos)}")
        ctx = memos[0].get("rcp_ctx", {}).get(self.source[layer])
        if ctx is None:  # the image was not pruned (bypass): no repair
            return None
        gate = torch.ones(1, x.shape[0], dtype=torch.bool, device=x.device)
        e_mask, e_pruned = ctx
        return self.plugins.repair(layer, x[None], (e_mask[None], e_pruned[None]), gate)[0]
