"""RCP trainer (spec rcp.md §E) on `accelerate`: the same code runs on one CPU, one GPU or several GPUs/nodes.

    accelerate launch --num_processes 8 -m vtprune.commands.rcp --model DIR --data vqa.jsonl --budget 64 --out run/

- Frozen backbone (vision tower, projector, LLM) in eval mode; trainable: the `RCPPlugins` (fp32 weights).
- Each micro-batch: images encoded once (no grad); the teacher pass (same model, all tokens, no plug-ins,
  no_grad) collects the repair layers' outputs at generation positions; the student pass is the mask route
  (`mask_route.student_forward`) with Gumbel STE masks; losses (`losses.py`) with the spec's weights.
- DDP: the plug-ins are wrapped (via a `TrainStep` module that holds the backbone outside its parameters);
  the repair moments use the states of the global micro-batch (differentiable all-gather). With gradient
  accumulation the moments are per micro-batch (each micro-batch is gathered across processes).
- Data order: a seeded permutation per epoch; optimiser step t, micro-step j, rank r takes global samples
  ((t·A + j)·W + r)·B … +B. Gumbel noise and query-row dropout come from per-sample generators seeded by
  (seed, sample id, epoch) (spec README §10); the MLP dropout uses the torch RNG (saved in checkpoints).
- AdamW (lr 5e-5, wd 0.01), cosine LR with 10 % warm-up and floor 0.1·lr; bf16 autocast on GPU
  (`precision="auto"`), fp32 or bf16 on CPU; no gradient clipping; seed 42.
- Deviation (issue 22), the pruners' scalar logit offsets β: `beta_update="budget"` (default) takes them out of
  AdamW and moves them after every optimiser step by `β ← β − beta_lr·sign(r̄ − r*)` (beta_lr 0.05, the same
  warm-up, then constant: `schedule.beta_lr_factor`; r̄ of the step's global batch), a dual-ascent controller
  on the budget that the other loss terms do not move; the learned terms still see every loss. Why: under Adam a
  parameter moves by about its learning rate per step, so at lr 5e-5 β could travel at most ~0.06 logits in
  1 250 steps (the shipped built-in run's β stayed at 2.000 ± 0.002) and the budget came from the post-hoc δ;
  and the straight-through gradient on β collapses by orders of magnitude when the Gumbel noise stops (last
  20 % of the steps) while Adam's second moment remembers the earlier large ones for ~1 000 steps. Measured
  on the 3-layer built-in model (100 steps of 2 samples): with β in an AdamW group at 0.05, r̄ reached 0.11
  under noise, fell to 0.005 when the noise stopped and stayed there. `beta_update="loss"`: β in AdamW at
  `beta_lr` (its own group, no decay; `beta_lr=None`: the spec's single group).
- Repair loss normalised by the teacher's per-dimension std (`repair_norm="teacher_std"`, spec amendment
  2026-12); `"none"` is the reference's raw loss.
- Plug-in widths d' and b default to 512·d/4096 (`modules.scaled_width`: 512 on LLaVA-1.5-7B, 16 on the
  64-wide built-in v3 decoder); the trainable and the model's parameter counts are logged and recorded.
- Reaching the budget (spec amendment 2026-12): r̄ against r* and the per-pruner keep rates are logged (step log
  and a line every `log_every` steps); the config records `convergence` {r_bar (mean of the last 10 % of the
  steps), rho, delta, converged = |r̄ − ρ|/ρ ≤ 0.10 and |δ| ≤ 1.0}; OUT/README.md (the card) says NOT CONVERGED
  when it is not, and loading such a checkpoint warns (`checkpoint.RCPConvergenceWarning`).
- Resumable checkpoints in OUT/state/ (plug-ins, optimiser, scheduler, step, per-rank RNG); per-step log
  OUT/train_log.jsonl (losses, r̄, r_k, r*, τ, noise, lr); final artefacts OUT/rcp_plugins.safetensors +
  OUT/rcp_config.json after the δ calibration (binary search on a held-out slice, spec "Calibration").
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import checkpointing as cpt
from ..errors import BudgetError, VtpruneError
from . import checkpoint as ckpt
from .data import VQA_SUFFIX, Collator, Example, read_examples
from .losses import check_repair_norm, repair_loss, sparsity_loss, task_loss
from .mask_route import RouteBatch, prepare_batch, student_forward, teacher_states
from .modules import RCPPlugins, count_parameters, scaled_width
from .placement import Placement, placement_for
from .schedule import beta_lr_factor, gumbel_schedule, lr_factor, sparsity_target

NEXT_REFERENCE_TOKENS = 2880  # LLaVA-NeXT: token budgets are fractions of 2880 (spec table)


@dataclass
class RCPTrainConfig:
    """Training options; defaults are the spec's recipe (rcp.md §E)."""

    budget: int | float = 64  # layer-averaged visual tokens (an int >= 1) or a ratio of N (a float in (0, 1))
    steps: int | None = None  # optimiser steps; None: one epoch of the training samples
    batch: int = 2  # per process
    grad_accum: int = 4
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    lr_floor: float = 0.1
    seed: int = 42
    lambda_task: float = 1.5
    lambda_repair: float = 3.0
    lambda_sparse: float = 200.0
    alpha: float = 3.0
    tau_start: float = 1.5
    tau_end: float = 0.2
    anneal_until: float = 0.6
    noise_until: float = 0.8
    sparsity_warm: float = 0.1
    tau_eval: float = 0.2
    theta: float = 0.5
    d_prime: int | None = None  # None: scaled to the model, 512·d/4096 (modules.scaled_width)
    n_queries: int = 16
    heads: int = 4
    bottleneck: int | None = None  # None: scaled like d_prime
    repair_norm: str = "teacher_std"  # teacher_std (spec amendment 2026-12) | none (the reference's raw loss)
    beta_update: str = "budget"  # budget: β ← β − beta_lr·sign(r̄ − r*) each step | loss: β trained by AdamW
    beta_lr: float | None = 0.05  # β's step (budget) or learning rate (loss; None: the base group, the spec's)
    converge_tol: float = 0.10  # converged: |r̄ − ρ|/ρ <= converge_tol ...
    delta_tol: float = 1.0  # ... and |δ| <= delta_tol
    log_every: int | None = None  # a progress line every N steps (None: 20 lines per run)
    dropout: float = 0.2
    query_dropout: float = 0.2
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    max_length: int = 1024
    suffix: str | None = None  # None: the spec's VQAv2 suffix when the model has a chat template, else ""
    save_every: int = 100
    calib_n: int = 500  # held-out samples for δ (taken from --data unless calib_data); 0: no calibration
    calib_data: str | None = None
    calib_batch: int = 8
    calib_tol: float = 0.02
    calib_inner: float = 0.01
    save_dtype: str = "fp32"  # fp32 | fp16 | bf16 for the final artefact
    stop_after: int | None = None  # stop (after a checkpoint) once this many steps are done
    time_limit: float | None = None  # seconds; stop (after a checkpoint) when exceeded


# --- helpers --------------------------------------------------------------------------------------------
def check_config(cfg: RCPTrainConfig) -> None:
    """One-line `VtpruneError` for option values the trainer cannot use."""
    try:
        check_repair_norm(cfg.repair_norm)
    except ValueError as err:
        raise VtpruneError(str(err)) from None
    for name in ("d_prime", "bottleneck"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise VtpruneError(f"{name} must be an int >= 1 or None (scaled to the model), got {v!r}")
    if cfg.d_prime is not None and cfg.d_prime % cfg.heads:
        raise VtpruneError(f"d_prime ({cfg.d_prime}) must be a multiple of heads ({cfg.heads})")
    if cfg.beta_lr is not None and not (isinstance(cfg.beta_lr, (int, float)) and cfg.beta_lr > 0):
        raise VtpruneError(f"beta_lr must be a number > 0 or None (the base lr), got {cfg.beta_lr!r}")
    if cfg.beta_update not in ("budget", "loss"):
        raise VtpruneError(f"beta_update must be 'budget' or 'loss', got {cfg.beta_update!r}")
    if cfg.beta_update == "budget" and cfg.beta_lr is None:
        raise VtpruneError("beta_update='budget' needs a beta_lr > 0 (the controller's step)")
    if not 0 < cfg.converge_tol or not 0 <= cfg.delta_tol:
        raise VtpruneError("converge_tol must be > 0 and delta_tol >= 0")


def plugin_widths(cfg: RCPTrainConfig, hidden_size: int) -> tuple[int, int]:
    """(d', b): the configured ones, or 512·d/4096 scaled to the decoder width (`scaled_width`)."""
    d_prime = cfg.d_prime if cfg.d_prime is not None else scaled_width(hidden_size, cfg.heads)
    bottleneck = cfg.bottleneck if cfg.bottleneck is not None else scaled_width(hidden_size, cfg.heads)
    return d_prime, bottleneck


def build_plugins(cfg: RCPTrainConfig, hidden_size: int, placement: Placement) -> RCPPlugins:
    """The initial plug-ins of a run: the torch RNG is seeded with `cfg.seed` right before they are built, so the
    same config always gives the same initial weights (`initial_plugins` rebuilds them from a checkpoint)."""
    d_prime, bottleneck = plugin_widths(cfg, hidden_size)
    torch.manual_seed(cfg.seed)
    return RCPPlugins(
        hidden_size,
        placement,
        d_prime=d_prime,
        n_queries=cfg.n_queries,
        heads=cfg.heads,
        bottleneck=bottleneck,
        dropout=cfg.dropout,
        query_dropout=cfg.query_dropout,
    )


def initial_plugins(config: dict) -> RCPPlugins:
    """The plug-ins a checkpoint's training run started from (same sizes, placement and seed), in eval mode."""
    cfg = RCPTrainConfig(
        seed=int(config["seed"]),
        d_prime=int(config["d_prime"]),
        bottleneck=int(config["bottleneck"]),
        n_queries=int(config["n_queries"]),
        heads=int(config["heads"]),
        dropout=float(config["dropout"]),
        query_dropout=float(config["query_dropout"]),
    )
    plugins = build_plugins(cfg, int(config["hidden_size"]), Placement.from_dict(config))
    return plugins.eval()


def _betas(plugins: RCPPlugins) -> list[nn.Parameter]:
    return [p for name, p in plugins.named_parameters() if name.startswith("pruner.") and name.endswith(".beta")]


def param_groups(plugins: RCPPlugins, cfg: RCPTrainConfig) -> list[dict]:
    """AdamW groups.  beta_update="budget": every parameter but the pruners' β (the controller moves those);
    "loss": everything at (lr, weight_decay), with `beta_lr` the β alone in a group at (beta_lr, 0)."""
    ids = {id(p) for p in _betas(plugins)}
    rest = [p for p in plugins.parameters() if id(p) not in ids]
    if cfg.beta_update == "budget":
        return [{"params": rest}]
    if cfg.beta_lr is None:
        return [{"params": list(plugins.parameters())}]
    return [{"params": rest}, {"params": _betas(plugins), "lr": float(cfg.beta_lr), "weight_decay": 0.0}]


@torch.no_grad()
def budget_step(plugins: RCPPlugins, r_bar: float, r_target: float, step_size: float) -> None:
    """The budget controller (beta_update="budget"): every pruner's β ← β − step·sign(r̄ − r*)."""
    sign = (r_bar > r_target) - (r_bar < r_target)
    for beta in _betas(plugins):
        beta.sub_(step_size * sign)
        beta.grad = None  # not an optimiser parameter: its gradient is never used


def convergence(records: list[dict], rho: float, delta: float, cfg: RCPTrainConfig, delta_calibrated: bool) -> dict:
    """Did training reach its budget (spec amendment 2026-12)?  records: the step log; r̄ and the per-pruner keep
    rates are averaged over the last 10 % of the steps (at least one).  -> {r_bar, r_k, window, rho, delta,
    rel_error, converged, criteria, delta_calibrated}."""
    steps = sorted((r for r in records if isinstance(r.get("r_bar"), (int, float))), key=lambda r: r["step"])
    if not steps:
        return {"converged": False, "reason": "no training steps logged", "rho": rho, "delta": delta}
    window = max(1, math.ceil(0.1 * len(steps)))
    tail = steps[-window:]
    r_bar = sum(r["r_bar"] for r in tail) / window
    r_k = [sum(r["r_k"][i] for r in tail) / window for i in range(len(tail[0]["r_k"]))]
    rel = abs(r_bar - rho) / rho
    ok = rel <= cfg.converge_tol and abs(delta) <= cfg.delta_tol
    return {
        "r_bar": round(r_bar, 5),
        "r_k": [round(x, 5) for x in r_k],
        "window": window,
        "rho": rho,
        "delta": float(delta),
        "rel_error": round(rel, 5),
        "converged": bool(ok),
        "criteria": f"|r_bar - rho|/rho <= {cfg.converge_tol:g} and |delta| <= {cfg.delta_tol:g}",
        "delta_calibrated": bool(delta_calibrated),
    }


def target_ratio(budget: float, model) -> tuple[float, int]:
    """(ρ, reference N): token budgets divide by the nominal N (576), LLaVA-NeXT by 2880.  The budget follows
    `vtprune.apply`'s rule (`Budget.parse`): an int is a token count, a float a ratio in (0, 1)."""
    from ..budget import Budget
    from ..models import adapter_for

    value = Budget.parse(budget).value
    n = adapter_for(model).nominal_visual_tokens() or NEXT_REFERENCE_TOKENS
    rho = float(value) if isinstance(value, float) else float(value) / n
    if rho >= 1:
        raise BudgetError(f"budget {budget} keeps every one of the {n} visual tokens: nothing to train")
    return rho, n


def check_feasible(placement: Placement, rho: float, n: int) -> None:
    low = placement.min_layer_average_tokens(n)
    if rho * n < low - 1e-9:
        raise BudgetError(
            f"a layer-averaged budget of {rho * n:.1f} tokens is below the smallest RCP can reach with pruning "
            f"layers {list(placement.pruning_layers)} of {placement.num_layers}: {math.ceil(low)} tokens"
        )


def sample_generator(seed: int, key: str, epoch: int) -> torch.Generator:
    """Generator for one sample's training noise, seeded by (seed, sample id, epoch)."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}|{key}|{epoch}".encode()))


def per_sample_noise(keys, epochs, slot_valid, layers, n_queries, query_dropout, seed):
    """Uniforms for the logistic noise {ℓ: (B, N)} and query-row keep masks {ℓ: (B, n_q)} from per-sample
    generators (each sample draws for its own N, so the values do not depend on the batch)."""
    B, N = slot_valid.shape
    counts = slot_valid.sum(-1).tolist()
    u = {ell: torch.full((B, N), 0.5) for ell in layers}
    keep = {ell: torch.ones(B, n_queries) for ell in layers}
    for b, (key, epoch) in enumerate(zip(keys, epochs, strict=True)):
        g = sample_generator(seed, key, epoch)
        for ell in layers:
            u[ell][b, : counts[b]] = torch.rand(counts[b], generator=g)
            keep[ell][b] = (torch.rand(n_queries, generator=g) >= query_dropout).float()
    dev = slot_valid.device
    return {k: v.to(dev) for k, v in u.items()}, {k: v.to(dev) for k, v in keep.items()}


def batch_to_route(model, batch: dict, device) -> RouteBatch:
    """A collated batch (`data.Collator`) -> RouteBatch on `device` (images encoded, no grad)."""
    dtype = next(model.parameters()).dtype
    image_kwargs = {"pixel_values": batch["pixel_values"].to(device, dtype)}
    if "image_sizes" in batch:
        image_kwargs["image_sizes"] = batch["image_sizes"].to(device)
    gen = (batch["targets"] != -100).to(device)
    return prepare_batch(
        model,
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        image_kwargs,
        prompt_end=batch["prompt_end"].to(device),
        gen=gen,
    )


class TrainStep(nn.Module):
    """One micro-batch forward (teacher + student + losses); only the plug-ins are parameters."""

    def __init__(self, model, plugins: RCPPlugins, cfg: RCPTrainConfig, rho: float):
        super().__init__()
        self.plugins = plugins
        object.__setattr__(self, "backbone", model)  # not a submodule: DDP must not see the frozen model
        self.cfg = cfg
        self.rho = rho

    def forward(self, batch: dict, epochs: list[int], tau: float, noise_on: bool, r_target: float) -> dict:
        model, cfg, placement = self.backbone, self.cfg, self.plugins.placement
        device = next(self.plugins.parameters()).device
        rb = batch_to_route(model, batch, device)
        teacher = teacher_states(model, rb, placement.repair_layers)
        noise, qkeep = per_sample_noise(
            batch["keys"], epochs, rb.slot_valid, placement.pruning_layers, cfg.n_queries, cfg.query_dropout, cfg.seed
        )
        hidden, st = student_forward(
            model, self.plugins, rb, train=True, tau=tau, noise_on=noise_on, noise=noise, query_keep=qkeep
        )
        rows = hidden[rb.gen]
        logits = model.get_output_embeddings()(rows)
        targets = batch["targets"].to(device)[rb.gen]
        sample = rb.gen.nonzero()[:, 0]
        l_task = task_loss(logits, targets, sample, rb.gen.shape[0])
        l_rep = repair_loss(st.repair, teacher, cfg.alpha, norm=cfg.repair_norm)
        r_k = torch.stack([st.ratios[ell].mean() for ell in placement.pruning_layers])
        r_bar = placement.layer_average(list(r_k))
        l_sp = sparsity_loss(r_bar, r_target)
        loss = cfg.lambda_task * l_task + cfg.lambda_repair * l_rep + cfg.lambda_sparse * l_sp
        return {
            "loss": loss,
            "task": l_task.detach(),
            "repair": l_rep.detach(),
            "sparse": l_sp.detach(),
            "r_bar": r_bar.detach(),
            "r_k": r_k.detach(),
        }


def _indices(step: int, micro: int, rank: int, world: int, batch: int, accum: int, n: int, seed: int, perms: dict):
    """[(sample index, epoch)] of one rank's micro-batch."""
    g0 = ((step * accum + micro) * world + rank) * batch
    out = []
    for g in range(g0, g0 + batch):
        epoch = g // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append((int(perms[epoch][g % n]), epoch))
    return out


def split_calibration(examples: list[Example], cfg: RCPTrainConfig) -> tuple[list[Example], list[Example]]:
    """(training, calibration) samples: `calib_data` if given, else a seeded hold-out of min(calib_n, 10 %)."""
    if cfg.calib_n <= 0:
        return examples, []
    if cfg.calib_data:
        return examples, read_examples(cfg.calib_data)[: cfg.calib_n]
    n_cal = min(cfg.calib_n, len(examples) // 10)
    if n_cal <= 0:
        return examples, []
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + 7)).tolist()
    held = set(perm[:n_cal])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


# --- calibration ----------------------------------------------------------------------------------------
@torch.no_grad()
def kept_tokens(model, plugins: RCPPlugins, routes: list[RouteBatch], delta: float, cfg: RCPTrainConfig) -> float:
    """Mean layer-averaged kept visual tokens r̄·N over the samples, inference masks with offset δ."""
    placement = plugins.placement
    total, count = 0.0, 0
    for rb in routes:
        _, st = student_forward(
            model,
            plugins,
            rb,
            train=False,
            delta=delta,
            tau_eval=cfg.tau_eval,
            theta=cfg.theta,
            stop_after_pruning=True,
        )
        n = rb.slot_valid.sum(-1).float()
        r_bar = placement.layer_average([st.ratios[ell] for ell in placement.pruning_layers])  # (B,)
        total += float((r_bar * n).sum())
        count += int(n.numel())
    return total / max(count, 1)


@torch.no_grad()
def calibrate_delta(
    model, plugins: RCPPlugins, routes: list[RouteBatch], rho: float, cfg: RCPTrainConfig, log=print
) -> dict:
    """Spec "Calibration": if the mean r̄·N misses ρ·N by more than `calib_tol`, binary-search a shared logit
    offset δ ∈ [−10, 10] until within `calib_inner`.  -> {delta, kept, target, evaluations}."""
    was = plugins.training
    plugins.eval()
    try:
        n_mean = sum(float(rb.slot_valid.sum()) for rb in routes) / max(sum(rb.slot_valid.shape[0] for rb in routes), 1)
        target = rho * n_mean
        history = []

        def evaluate(d):
            k = kept_tokens(model, plugins, routes, d, cfg)
            history.append({"delta": d, "kept": k})
            return k

        kept = evaluate(0.0)
        delta = 0.0
        if abs(kept - target) > cfg.calib_tol * target:
            lo, hi = -10.0, 10.0
            best = (abs(kept - target), 0.0, kept)
            for _ in range(40):
                mid = (lo + hi) / 2
                k = evaluate(mid)
                best = min(best, (abs(k - target), mid, k))
                if abs(k - target) <= cfg.calib_inner * target:
                    break
                lo, hi = (mid, hi) if k < target else (lo, mid)
            _, delta, kept = best
        log(f"calibration: delta={delta:.4f} kept={kept:.2f} target={target:.2f} ({len(history)} evaluations)")
        return {"delta": delta, "kept": kept, "target": target, "evaluations": history}
    finally:
        plugins.train(was)


# --- the loop -------------------------------------------------------------------------------------------
def _copy_from(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def _log_lines_before(log_path: Path, start: int) -> list[str]:
    """Lines of the step log with step < start; a line that does not parse (cut short by a kill) is dropped."""
    kept = []
    for ln in log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] < start:
            kept.append(ln)
    return kept


def _resume(folder: Path, fingerprint: dict, core, optimizer, scheduler, rank: int, device, hint: str) -> int:
    """Load a verified checkpoint folder into the plug-ins, optimiser, scheduler and RNG.  -> its step."""
    meta = cpt.read_json(folder / "trainer.json")
    if not isinstance(meta, dict) or isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int):
        raise cpt.CheckpointError(f"{folder / 'trainer.json'}: expected an object with an integer 'step'; {hint}")
    if meta.get("fingerprint") != fingerprint:
        raise VtpruneError(
            f"{folder} was written by a different run ({meta.get('fingerprint')}); use another --out or --fresh"
        )
    try:
        core.plugins.load_state_dict(cpt.load_tensors(folder / "plugins.safetensors", device))
        optimizer.optimizer.load_state_dict(cpt.load_state(folder, "optimizer"))
        scheduler.load_state_dict(cpt.load_state(folder, "scheduler"))
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        if isinstance(err, VtpruneError):
            raise
        raise cpt.CheckpointError(f"{folder}: state does not fit this run ({str(err)[:200]}); {hint}") from None
    if (folder / f"rng_{rank}.json").exists():
        cpt.set_rng_state(cpt.load_state(folder, f"rng_{rank}"), str(folder / f"rng_{rank}.json"))
    return int(meta["step"])


def _fingerprint(cfg: RCPTrainConfig, total: int, world: int, n_train: int, model_id: str) -> dict:
    keys = (
        "budget",
        "batch",
        "grad_accum",
        "lr",
        "weight_decay",
        "seed",
        "lambda_task",
        "lambda_repair",
        "lambda_sparse",
        "alpha",
        "repair_norm",
        "beta_lr",
        "beta_update",
        "d_prime",
        "bottleneck",
    )
    return {
        **{k: list(v) if isinstance(v := getattr(cfg, k), tuple) else v for k in keys},  # JSON-comparable
        "total_steps": total,
        "world_size": world,
        "n_train": n_train,
        "model": model_id,
    }


def train(
    model_id,
    data: str | Path,
    out: str | Path,
    cfg: RCPTrainConfig | None = None,
    *,
    device: str = "auto",
    resume: str = "auto",
    progress: bool = True,
    log=print,
    loaded=None,
    return_plugins: bool = False,
) -> dict:
    """Train RCP plug-ins; returns a summary dict.  model_id: `builtin:NAME` or a model directory (see
    `vtprune.runner.load`); `loaded`: an already loaded `runner.Loaded` instead.  resume: "auto" (continue
    from OUT/state if present), "require" (error if absent) or "never" (start over).  return_plugins: put this
    process's `RCPPlugins` into the summary under "plugins"."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from ..loading import load

    cfg = cfg or RCPTrainConfig()
    check_config(cfg)
    out = Path(out)
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    precision = cfg.precision if cfg.precision != "auto" else ("fp32" if cpu else "bf16")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision="bf16" if precision == "bf16" else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    main = accelerator.is_main_process
    say = log if main else (lambda *_: None)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    if loaded is None:
        dtype = torch.bfloat16 if (precision == "bf16" and not cpu) else torch.float32
        loaded = load(str(model_id), device=str(accelerator.device), dtype=dtype)
    model = loaded.model.to(accelerator.device).eval()
    model.requires_grad_(False)
    sig = ckpt.model_signature(model)
    rho, n_ref = target_ratio(cfg.budget, model)
    placement = placement_for(sig["num_layers"], rho)
    check_feasible(placement, rho, n_ref)

    suffix = cfg.suffix if cfg.suffix is not None else (VQA_SUFFIX if loaded.chat_template else "")
    collate = Collator(loaded, suffix=suffix, max_length=cfg.max_length)
    train_set, calib_set = split_calibration(read_examples(data), cfg)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch * cfg.grad_accum * world
    total = cfg.steps or max(1, len(train_set) // per_step)

    plugins = build_plugins(cfg, sig["hidden_size"], placement).to(accelerator.device)
    n_plugins = count_parameters(plugins)
    n_model = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(param_groups(plugins, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    factors = [lambda s: lr_factor(s, total, cfg.warmup, cfg.lr_floor)]
    if cfg.beta_update == "loss" and cfg.beta_lr is not None:  # β's group: warm-up, then constant
        factors.append(lambda s: beta_lr_factor(s, total, cfg.warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    step_module = TrainStep(model, plugins, cfg, rho)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    core = accelerator.unwrap_model(step_module)

    state_dir = out / "state"
    fingerprint = _fingerprint(cfg, total, world, len(train_set), str(model_id))
    hint = f"pass --fresh (or delete {state_dir})"
    start = 0
    folder = None
    if resume == "never":
        accelerator.wait_for_everyone()
        if main and state_dir.exists():  # vtprune's own state folder: start over
            shutil.rmtree(state_dir)
        accelerator.wait_for_everyone()
    else:
        legacy = sorted(p.name for p in state_dir.glob("*") if p.name == "trainer.json" or p.suffix == ".pt")
        if legacy:
            raise cpt.CheckpointError(
                f"{state_dir} holds a checkpoint in the old pickle format ({', '.join(legacy)}), which vtprune no "
                f"longer loads (unpickling can run code); to start fresh, {hint}"
            )
        folder = cpt.latest(state_dir, hint)
    if folder is not None:
        start = _resume(folder, fingerprint, core, optimizer, scheduler, rank, accelerator.device, hint)
        say(f"resumed from {folder} at step {start}/{total}")
    elif resume == "require":
        raise VtpruneError(f"nothing to resume in {state_dir} (no published checkpoint)")

    log_path = out / "train_log.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cpt.clean_temporaries(state_dir)
        if log_path.exists():  # drop entries of steps that will be redone (and a line cut short by a kill)
            log_path.write_text("".join(ln + "\n" for ln in _log_lines_before(log_path, start)))
        elif start:
            log_path.write_text("")
    accelerator.wait_for_everyone()

    def save_state(done: int) -> None:
        accelerator.wait_for_everyone()
        stage = state_dir / f".stage-{done:08d}"
        if not main:  # other ranks hand their RNG state to the main process through a staging folder
            stage.mkdir(parents=True, exist_ok=True)
            for name, writer in cpt.state_files(f"rng_{rank}", cpt.rng_state()).items():
                writer(stage / name)
        accelerator.wait_for_everyone()
        if main:
            sd = {k: v.detach().cpu().contiguous() for k, v in core.plugins.state_dict().items()}
            files = {"plugins.safetensors": lambda p: cpt.save_tensors(sd, p)}
            files.update(cpt.state_files("optimizer", optimizer.optimizer.state_dict()))
            files.update(cpt.state_files("scheduler", scheduler.state_dict()))
            files.update(cpt.state_files("rng_0", cpt.rng_state()))
            for r in range(1, world):
                for ext in (".json", ".safetensors"):
                    files[f"rng_{r}{ext}"] = partial(_copy_from, stage / f"rng_{r}{ext}")
            meta = {"step": done, "total": total, "fingerprint": fingerprint, "config": asdict(cfg)}
            files["trainer.json"] = cpt.json_file(meta)
            cpt.write(state_dir, done, files)
            shutil.rmtree(stage, ignore_errors=True)
        accelerator.wait_for_everyone()

    dims = core.plugins.dims
    say(
        f"RCP: {sig['model_class']} L={placement.num_layers} d={sig['hidden_size']}; pruning "
        f"{list(placement.pruning_layers)}, repair {placement.source_map}; rho={rho:.4f}; d'={dims['d_prime']} "
        f"b={dims['bottleneck']}: {n_plugins:,} trainable parameters next to the model's {n_model:,} "
        f"({100 * n_plugins / n_model:.2f} %); repair loss {cfg.repair_norm}; β by {cfg.beta_update} "
        f"({cfg.beta_lr or cfg.lr:g}); "
        f"{len(train_set)} training / {len(calib_set)} calibration samples; {total} steps of {per_step} samples on "
        f"{world} process(es), {precision}"
    )
    log_every = cfg.log_every or max(1, total // 20)

    perms: dict = {}
    bar = None
    if progress and main:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from vtprune.progress import Progress  # rich in a terminal, plain periodic lines in a log

        bar = Progress(
            TextColumn("train-rcp"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        bar.start()
        task = bar.add_task("train", total=total, completed=start, info="")
    t0 = time.time()
    step = start
    stopped = False
    core.plugins.train()
    try:
        while step < total:
            tau, noise_on = gumbel_schedule(step, total, cfg.tau_start, cfg.tau_end, cfg.anneal_until, cfg.noise_until)
            r_target = sparsity_target(step, total, rho, cfg.sparsity_warm)
            sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.grad_accum):
                picks = _indices(step, micro, rank, world, cfg.batch, cfg.grad_accum, len(train_set), cfg.seed, perms)
                batch = collate([train_set[i] for i, _ in picks])
                sync = micro == cfg.grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(step_module):
                    res = step_module(batch, [e for _, e in picks], tau, noise_on, r_target)
                    accelerator.backward(res["loss"] / cfg.grad_accum)
                for k, v in res.items():
                    sums[k] = sums.get(k, 0) + v.detach().float() / cfg.grad_accum
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats = {k: accelerator.reduce(v, "mean") for k, v in sums.items()}
            if cfg.beta_update == "budget":  # the same global r̄ on every rank: identical β everywhere
                size = cfg.beta_lr * beta_lr_factor(step, total, cfg.warmup)
                budget_step(core.plugins, float(stats["r_bar"]), r_target, size)
            step += 1
            record = {
                "step": step - 1,
                "loss": float(stats["loss"]),
                "task": float(stats["task"]),
                "repair": float(stats["repair"]),
                "sparse": float(stats["sparse"]),
                "r_bar": float(stats["r_bar"]),
                "r_k": [round(float(x), 5) for x in stats["r_k"]],
                "r_target": r_target,
                "tau": tau,
                "noise": noise_on,
                "lr": lr,
                "wall": round(time.time() - t0, 2),
            }
            if main:
                with open(log_path, "a") as f:
                    f.write(cpt.dumps_strict(record) + "\n")  # strict JSON: a NaN loss is written as null
            keep = "/".join(f"{x:.2f}" for x in record["r_k"])
            if bar is not None:
                bar.update(
                    task,
                    completed=step,
                    info=f"loss {record['loss']:.3f} r̄ {record['r_bar']:.3f}→{r_target:.3f} keep {keep} τ {tau:.2f}",
                )
            elif step % log_every == 0 or step == total:
                say(
                    f"step {step}/{total}: r̄ {record['r_bar']:.4f} (r* {r_target:.4f}); keep per pruner "
                    f"{dict(zip(placement.pruning_layers, record['r_k'], strict=True))}; loss {record['loss']:.4f} "
                    f"(task {record['task']:.4f}, repair {record['repair']:.4f}, sparse {record['sparse']:.4f}); "
                    f"τ {tau:.2f}; β {[round(p.beta.detach().item(), 4) for p in core.plugins.pruner.values()]}"
                )
            over_time = cfg.time_limit is not None and time.time() - t0 > cfg.time_limit
            flag = torch.tensor([1.0 if over_time else 0.0], device=accelerator.device)
            over_time = bool(accelerator.reduce(flag, "sum") > 0)
            stopped = (cfg.stop_after is not None and step >= cfg.stop_after) or over_time
            if step % cfg.save_every == 0 or step == total or stopped:
                save_state(step)
            if stopped and step < total:
                break
    finally:
        if bar is not None:
            bar.stop()

    summary = {
        "steps_done": step,
        "total_steps": total,
        "rho": rho,
        "placement": placement.to_dict(),
        "trainable_parameters": n_plugins,
        "model_parameters": n_model,
        "wall_s": round(time.time() - t0, 1),
    }
    if return_plugins:
        summary["plugins"] = core.plugins
    if step < total:
        say(f"stopped at step {step}/{total}; resume with the same command")
        return summary

    calibration = {"delta": 0.0, "skipped": True}
    if main and calib_set:
        routes = []
        for i in range(0, len(calib_set), cfg.calib_batch):
            b = collate(calib_set[i : i + cfg.calib_batch])
            b["targets"] = torch.full_like(b["targets"], -100)  # masks only: no DRA rows needed
            routes.append(batch_to_route(model, b, accelerator.device))
        with accelerator.autocast():
            calibration = calibrate_delta(model, core.plugins, routes, rho, cfg, log=say)
    conv = None
    if main:
        records = [json.loads(ln) for ln in _log_lines_before(log_path, total)]
        conv = convergence(records, rho, float(calibration["delta"]), cfg, not calibration.get("skipped", False))
        if "evaluations" in calibration and calibration["evaluations"]:  # δ = 0 is always evaluated first
            first = calibration["evaluations"][0]
            conv["r_bar_eval_delta0"] = round(first["kept"] / calibration["target"] * rho, 5)
        verdict = "converged" if conv["converged"] else "NOT CONVERGED"
        say(
            f"budget: final r̄ {conv.get('r_bar')} for ρ {rho:.4f} (relative error {conv.get('rel_error')}), "
            f"δ {conv['delta']:.3f}: {verdict} ({conv.get('criteria', '')})"
        )
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.save_dtype]
        config = {
            **sig,
            "base_model": {"id": str(model_id), "revision": getattr(model.config, "_commit_hash", None)},
            "n_visual": n_ref,
            "budget": rho * n_ref,
            "rho": rho,
            "loss_weights": {"task": cfg.lambda_task, "repair": cfg.lambda_repair, "sparse": cfg.lambda_sparse},
            "alpha": cfg.alpha,
            "tau_eval": cfg.tau_eval,
            "theta": cfg.theta,
            "delta": float(calibration["delta"]),
            "steps": total,
            "seed": cfg.seed,
            "vtprune_version": _version(),
            "calibration": {k: v for k, v in calibration.items() if k != "evaluations"},
            "repair_norm": cfg.repair_norm,
            "convergence": conv,
            "parameters": {"plugins": n_plugins, "model": n_model, "ratio": n_plugins / n_model},
            "training": {
                "config": asdict(cfg),
                "world_size": world,
                "precision": precision,
                "n_train": len(train_set),
                "n_calibration": len(calib_set),
                "data": str(Path(data).resolve()),
            },
        }
        ckpt.save_checkpoint(out, core.plugins, config, dtype=dtype)
        ckpt.write_card(out)
        say(f"wrote {out / ckpt.WEIGHTS_NAME}, {out / ckpt.CONFIG_NAME} and {out / ckpt.CARD_NAME}")
    accelerator.wait_for_everyone()
    summary["calibration"] = {k: v for k, v in calibration.items() if k != "evaluations"}
    summary["convergence"] = conv
    return summary


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"
