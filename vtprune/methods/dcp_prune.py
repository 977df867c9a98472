"""DCP-Prune: ACGR context transfer into anchors, κ distribution-consistency trigger, TATCS re-selection.

Spec: dcp_prune.md (almost every formula there is the spec's own decision; the paper ships no code).
Per crop c (per-crop quotas, README §8) with N_c candidates and quota K, all math in fp32:

1. ACGR(K_a): anchors = top-K_a of `cls_attention` s (stable ties), context = the rest; for a context token j
   and anchor i, `logit_ji = (k̂_j·k̂_i)/semantic_temperature − ‖p_j − p_i‖²/(2σ²)`, σ² = N_c/K_a (k̂ = L2-
   normalised `vision_head_keys`, p = grid (row, col)); each context token keeps its `edges` largest logits
   (stable ties), `W_ji` = softmax over them; masses `μ = s/mean(s)` (anchors and context alike); tokens
   represented `w_i = 1 + Σ_j W_ji` (used by κ, whatever the recovery). Recovery (option `recovery`, spec step 1.5
   amended 2026-12):
   - "mass" (default): context mass `m_i = Σ_j W_ji μ_j`, share `c_i = m_i/(μ_i + m_i)` capped at λ_ctx =
     `context_cap` (the capped weights W' = W·λμ_i/((1−λ)m_i) make the share exactly λ), and
     `z̃_i = (μ_i z_i + Σ_j W'_ji μ_j z_j)/(μ_i + Σ_j W'_ji μ_j)`, computed as `(1 − c'_i) z_i + c'_i z̄_i` with
     c'_i = min(c_i, λ) and z̄_i = Σ_j W_ji μ_j z_j / m_i (the same value; an anchor without context mass,
     m_i = 0, keeps its own feature);
   - "none": the anchors' own features (the ablation row every report shows);
   - "uniform": the original rule `z̃_i = (z_i + Σ_j W_ji μ_j z_j)/(1 + Σ_j W_ji μ_j)` (earlier numbers).
2. κ(Z, Z', w) = mean_d KL(N(μ_f, σ²_f) ‖ N(μ_k, σ²_k)) on unit-normalised rows, kept moments weighted by w,
   `σ²_k ← K/(K+shrinkage)·σ²_k + shrinkage/(K+shrinkage)·σ²_f`, then `eps` added to both variances.
3. Trigger: Z_A = ACGR(K); κ_A ≤ τ_κ ⇒ output Z_A.
4. TATCS (κ_A > τ_κ): pool = ACGR(min(N_c, pool_factor·K)); text relevance r = min–max of max_t cos(z', T_t)
   (0 when the question is empty or r is constant), ŝ = min–max of the pool's s; centres by farthest-point
   seeding from argmax(ŝ + r) on cosine distance; assignment `argmax_u ẑ'_i·ẑ'_{c_u} − gamma·|r_i − r_{c_u}|`
   (centres forced into their own cluster); representative `argmax_{i∈C_u} mean_{j∈C_u} ẑ'_i·ẑ'_j + gamma_r·r_i`
   (ties, within 1e-6, to the lower index); output = the representatives' recovered pool tokens, mass = Σ w' over the
   cluster. Guard: Z_T only if κ_T < κ_A, else Z_A.
Output: exactly K tokens per image in ascending representative index (`keep` positions, README §6).

Threshold τ_κ (spec, amended 2026-12): option `tau_kappa` (source "user"); None looks up `calibration_key`, else
the attached model's key (`vtprune.shipped.builtin_key` of its `name_or_path`), in the shipped table
`vtprune/assets/dcp_tau.json` overlaid with the per-user table (source "calibrated"; written by
`vtprune calibrate-dcp` / `vtprune.calibration.dcp`); with no entry it uses 0.3 (source "fallback") and `apply`
warns once per model key, naming `vtprune calibrate-dcp`.

Records: `vtprune.last_run(model).method_info` = {tau_kappa, tau_source, calibration_key, recovery,
context_cap}; `SampleRecord.method_info[image]` = {kappa_a, branch ("ACGR" | "TATCS"), kappa_t, crops: [...]}
(per crop: crop, n, k, kappa_a, kappa_t, branch, guard); with several crops (LLaVA-NeXT views) the image's
kappa_a is the largest crop κ_A and its branch "TATCS" when any crop's output came from TATCS. `method.decisions`
(a bounded deque, newest last) keeps one list of `CropDecision` per `select` call for diagnostics.

Deviations / engine-imposed choices:
- LLaVA-NeXT: a "crop" is one vision view (`ImageTokens.view_members`): the base view and each CLIP tile
  (its unpadded positions), each with its own [CLS] row, quota and trigger, as the spec says.
- Masses use max(s, 0) (identical for attention scores, which are ≥ 0); if mean(max(s, 0)) = 0, μ ≡ 1.
- The context→anchor transfer uses a dense (K_a × |C|) coefficient matrix (a matmul) rather than a scatter:
  same result, deterministic on GPU (index_add uses atomics), O(K_a·|C|·D) instead of O(4·|C|·D).
- κ is clamped at 0 (it is a KL divergence; the clamp only removes fp32 rounding below 0).
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..budget import largest_remainder_split
from ..errors import VtpruneError
from ..shipped import builtin_key
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option, stable_topk

#: Recovery rules of ACGR step 1.5 (spec, amended 2026-12).
RECOVERIES = ("mass", "none", "uniform")
#: λ_ctx default (`DCPPruneConfig.context_cap`), chosen by `python benchmarks/dcp_sweep_v3.py sweep` on the
#: calibration split of the built-in benchmark, as spec step 1.5 allows (the spec's first default was 0.35).
DEFAULT_CONTEXT_CAP = 0.05
#: Keys already warned about a missing calibration (one warning per model key and process).
_WARNED: set[str] = set()

#: Shipped calibrated thresholds: {"version": 1, "values": {key: {"tau_kappa": float, ...}}}.
TAU_TABLE = Path(__file__).resolve().parent.parent / "assets" / "dcp_tau.json"
#: τ_κ when neither `tau_kappa` nor a calibrated value for `calibration_key` is available (spec).
FALLBACK_TAU = 0.3
#: Most recent per-image decisions kept in `DCPPrune.decisions`.
MAX_DECISIONS = 10_000
#: Reselection scores closer than this count as tied (fp32 rounding of mathematically equal scores).
TIE_TOL = 1e-6


class CalibrationWarning(UserWarning):
    """DCP-Prune runs with the fallback τ_κ because the model has no calibrated value."""


@dataclass
class DCPPruneConfig(MethodConfig):
    #: Trigger threshold τ_κ; None = the calibrated value for `calibration_key` / the model, else 0.3 (warned).
    tau_kappa: float | None = option(None, ge=0.0, allow_inf=True)
    #: Key of the calibration table (e.g. "builtin:shapes-llava", "llava-hf/llava-1.5-7b-hf"); None: the model's.
    calibration_key: str | None = option(None)
    #: ACGR recovery: "mass" (capped mass-weighted, default), "none" (anchors only), "uniform" (original rule).
    recovery: str = option("mass", choices=RECOVERIES)
    #: λ_ctx: the largest share of a recovered anchor that may come from its context tokens ("mass" only).
    #: 0.05 from the calibration-split sweep of the built-in benchmark (spec step 1.5; the spec's first default,
    #: 0.35, scored 0.715 against 0.734 there, paired 76 / 141; docs/methods.md "DCP-Prune").
    context_cap: float = option(DEFAULT_CONTEXT_CAP, ge=0.0, le=1.0)
    #: Temperature of the semantic (key cosine) term of the context→anchor logits.
    semantic_temperature: float = option(0.1, gt=0.0)
    #: Context→anchor edges kept per context token.
    edges: int = option(4, ge=1)
    #: TATCS candidate pool K' = min(N_c, pool_factor·K).
    pool_factor: int = option(4, ge=1)
    #: Text-relevance penalty in the TATCS assignment.
    gamma: float = option(0.5)
    #: Text-relevance bonus in the TATCS reselection.
    gamma_r: float = option(0.5)
    #: κ variance shrinkage constant.
    shrinkage: float = option(8.0, ge=0.0)
    #: κ variance floor.
    eps: float = option(1e-6, gt=0.0)


@dataclass(frozen=True)
class CropDecision:
    """What DCP-Prune did on one crop: branch is "all" (K ≥ N_c), "acgr" (κ_A ≤ τ), "tatcs" (TATCS output)
    or "guard" (TATCS ran but κ_T ≥ κ_A, ACGR output)."""

    crop: int
    n: int
    k: int
    kappa_a: float
    kappa_t: float | None
    branch: str


def load_tau_table(path: str | Path | None = None) -> dict[str, dict]:
    """The validated calibration table {key: {"tau_kappa": float, ...}} of `path`; None: the shipped table
    overlaid with the per-user one (`_dcp_tau.user_tau_path()`, written by `calibrate-dcp --write`)."""
    from ._dcp_tau import read_tau_table, user_tau_path

    if path is not None:
        return read_tau_table(path)
    return {**read_tau_table(TAU_TABLE), **read_tau_table(user_tau_path())}


def shipped_tau_kappa(key: str | None, path: str | Path | None = None) -> float | None:
    """Calibrated τ_κ for a model key from the shipped table, or None."""
    if key is None:
        return None
    entry = load_tau_table(path).get(key)
    return None if entry is None else float(entry["tau_kappa"])


# ------------------------------------------------------------------------------------------ tensor pieces


def acgr(
    z: torch.Tensor,
    s: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    k_a: int,
    temperature: float = 0.1,
    edges: int = 4,
    recovery: str = "mass",
    context_cap: float = DEFAULT_CONTEXT_CAP,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchor-Context Graph Recovery on one crop.

    z (n, D), s (n,), keys (n, d) L2-normalised, pos (n, 2) grid coordinates, 1 ≤ k_a ≤ n; recovery in
    `RECOVERIES`, context_cap = λ_ctx in [0, 1] ("mass" only).
    -> anchors (k_a,) int64 sorted ascending, recovered (k_a, D) fp32, w (k_a,) fp32 tokens represented.
    """
    if recovery not in RECOVERIES:
        raise VtpruneError(f"dcp_prune recovery must be one of {RECOVERIES}, got {recovery!r}")
    z = z.float()
    n = z.shape[0]
    anchors = stable_topk(s, k_a)
    if k_a >= n:
        return anchors, z[anchors].clone(), torch.ones(k_a, device=z.device)
    is_ctx = torch.ones(n, dtype=torch.bool, device=z.device)
    is_ctx[anchors] = False
    ctx = is_ctx.nonzero().flatten()
    kf = keys.float()
    sem = kf[ctx] @ kf[anchors].T  # (|C|, K_a)
    p = pos.float()
    d2 = (p[ctx, None, :] - p[None, anchors, :]).pow(2).sum(-1)
    logit = sem / temperature - d2 / (2.0 * (n / k_a))
    e = min(edges, k_a)
    top = torch.sort(logit, dim=1, descending=True, stable=True)
    W = top.values[:, :e].softmax(dim=1)  # (|C|, e)
    slot = top.indices[:, :e]  # anchor slots
    rows = torch.arange(len(ctx), device=z.device)[:, None].expand(-1, e)
    wmat = torch.zeros(k_a, len(ctx), device=z.device)
    wmat[slot, rows] = W  # each (anchor, context) pair appears at most once per row
    w = 1.0 + wmat.sum(1)
    z_a = z[anchors]
    if recovery == "none":
        return anchors, z_a.clone(), w
    sp = s.float().clamp(min=0.0)
    mean_s = sp.mean()
    mu = sp / mean_s if float(mean_s) > 0 else torch.ones(n, device=z.device)  # (n,) masses
    coef = wmat * mu[ctx][None, :]  # (K_a, |C|): W_ji μ_j
    mass = coef.sum(1)  # (K_a,) m_i
    pushed = coef @ z[ctx]  # (K_a, D): Σ_j W_ji μ_j z_j
    if recovery == "uniform":
        return anchors, (z_a + pushed) / (1.0 + mass)[:, None], w
    own = mu[anchors]  # (K_a,) μ_i
    total = own + mass
    share = torch.where(total > 0, mass / total.clamp(min=1e-30), torch.zeros_like(mass))
    share = share.clamp(max=context_cap)  # c'_i = min(c_i, λ_ctx)
    mean_ctx = pushed / mass.clamp(min=1e-30)[:, None]  # z̄_i (any value where m_i = 0: its share is 0)
    recovered = torch.where((share > 0)[:, None], (1.0 - share)[:, None] * z_a + share[:, None] * mean_ctx, z_a)
    return anchors, recovered, w


def kappa(
    z_full: torch.Tensor, z_kept: torch.Tensor, w: torch.Tensor, shrinkage: float = 8.0, eps: float = 1e-6
) -> torch.Tensor:
    """Distribution-consistency κ = mean_d KL(full ‖ kept) of diagonal Gaussians on unit-normalised rows.

    z_full (N, D), z_kept (K, D), w (K,) masses.  -> () fp32, ≥ 0.
    """
    zf = F.normalize(z_full.float(), dim=1)
    zk = F.normalize(z_kept.float(), dim=1)
    mu_f = zf.mean(0)
    var_f = (zf - mu_f).pow(2).mean(0)
    w = w.float().to(zk.device)
    total = w.sum()
    mu_k = (w[:, None] * zk).sum(0) / total
    var_k = (w[:, None] * (zk - mu_k).pow(2)).sum(0) / total
    k = zk.shape[0]
    var_k = (k / (k + shrinkage)) * var_k + (shrinkage / (k + shrinkage)) * var_f
    var_f = var_f + eps
    var_k = var_k + eps
    kl = 0.5 * (var_f / var_k + (mu_k - mu_f).pow(2) / var_k - 1.0 + torch.log(var_k / var_f))
    return kl.mean().clamp(min=0.0)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    if not bool(hi > lo):
        return torch.zeros_like(x)
    return (x - lo) / (hi - lo)


def text_relevance(z: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """r_i = max_t cos(z_i, T_t), min–max normalised; 0 when the question is empty or r is constant.

    z (n, D), text (T, D) or None.  -> (n,) fp32.
    """
    if text is None or text.numel() == 0:
        return torch.zeros(z.shape[0], device=z.device)
    zn = F.normalize(z.float(), dim=1)
    tn = F.normalize(text.float().to(z.device), dim=1)
    return _minmax((zn @ tn.T).amax(1))


def tatcs(
    zc: torch.Tensor,
    wc: torch.Tensor,
    sc: torch.Tensor,
    text: torch.Tensor | None,
    k: int,
    gamma: float = 0.5,
    gamma_r: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text-Aware Token Cluster Selection over a pool of K' recovered tokens, 1 ≤ k ≤ K'.

    zc (K', D) pool tokens, wc (K',) their masses, sc (K',) their scores, text (T, D) or None.
    -> reps (k,) pool indices sorted ascending, mass (k,) per rep (same order), centres (k,) in seeding
    order, labels (K',) cluster of each pool token (cluster u belongs to centres[u]).
    """
    zn = F.normalize(zc.float(), dim=1)
    m = zn.shape[0]
    r = text_relevance(zc, text)
    first = (_minmax(sc.float()) + r).argmax()
    centres = [first]
    chosen = torch.zeros(m, dtype=torch.bool, device=zn.device)
    chosen[first] = True
    mind = 1.0 - zn @ zn[first]
    for _ in range(1, k):  # farthest-point seeding: K greedy steps
        c = mind.masked_fill(chosen, float("-inf")).argmax()
        centres.append(c)
        chosen[c] = True
        mind = torch.minimum(mind, 1.0 - zn @ zn[c])
    cent = torch.stack(centres)
    sim = zn @ zn[cent].T - gamma * (r[:, None] - r[cent][None, :]).abs()  # (K', k)
    labels = sim.argmax(1)  # first maximum: ties to the lower u
    labels[cent] = torch.arange(k, device=zn.device)
    onehot = F.one_hot(labels, k).float()  # (K', k)
    cluster_sum = onehot.T @ zn  # (k, D)
    count = onehot.sum(0)
    score = (zn * cluster_sum[labels]).sum(1) / count[labels] + gamma_r * r
    member = onehot.bool()
    best = score[:, None].expand(-1, k).masked_fill(~member, float("-inf")).amax(0)  # (k,)
    # ties (within TIE_TOL: e.g. the two members of a pair score (1 + ẑ_i·ẑ_j)/2 alike) go to the lower index
    rep = (member & (score[:, None] >= best[None, :] - TIE_TOL)).float().argmax(0)
    mass = onehot.T @ wc.float().to(zn.device)
    order = rep.argsort()
    return rep[order], mass[order], cent, labels


def dcp_crop(
    z: torch.Tensor,
    s: torch.Tensor,
    keys: torch.Tensor,
    pos: torch.Tensor,
    text: torch.Tensor | None,
    k: int,
    tau: float,
    cfg: DCPPruneConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """One crop: -> keep (k,) local indices sorted, feats (k, D) fp32, masses (k,), decision fields."""
    n = z.shape[0]
    if k >= n:
        return (
            torch.arange(n, device=z.device),
            z.float(),
            torch.ones(n, device=z.device),
            {"kappa_a": 0.0, "kappa_t": None, "branch": "all"},
        )
    t, e, rec, cap = cfg.semantic_temperature, cfg.edges, cfg.recovery, cfg.context_cap
    anchors, z_a, w_a = acgr(z, s, keys, pos, k, t, e, rec, cap)
    kappa_a = float(kappa(z, z_a, w_a, cfg.shrinkage, cfg.eps))
    if kappa_a <= tau:
        return anchors, z_a, w_a, {"kappa_a": kappa_a, "kappa_t": None, "branch": "acgr"}
    pool, z_c, w_c = acgr(z, s, keys, pos, min(n, cfg.pool_factor * k), t, e, rec, cap)
    reps, mass, _, _ = tatcs(z_c, w_c, s.float()[pool], text, k, cfg.gamma, cfg.gamma_r)
    z_t = z_c[reps]
    kappa_t = float(kappa(z, z_t, mass, cfg.shrinkage, cfg.eps))
    if kappa_t < kappa_a:
        return pool[reps], z_t, mass, {"kappa_a": kappa_a, "kappa_t": kappa_t, "branch": "tatcs"}
    return anchors, z_a, w_a, {"kappa_a": kappa_a, "kappa_t": kappa_t, "branch": "guard"}


# ------------------------------------------------------------------------------------------------ method


def calibration_key_of(name: str) -> str:
    """Calibration-table key of a model's `name_or_path`: "builtin:NAME" for a shipped checkpoint."""
    return builtin_key(name)


@register(aliases=("dcp",))
class DCPPrune(PruningMethod):
    """ACGR anchors with context transfer; TATCS text-aware cluster re-selection when κ_A > τ_κ; per crop."""

    name = "dcp_prune"
    config_class = DCPPruneConfig
    merges = True

    def __init__(self, config: DCPPruneConfig | None = None):
        super().__init__(config)
        c = self.config
        if c.tau_kappa is not None and math.isnan(float(c.tau_kappa)):
            raise VtpruneError("dcp_prune tau_kappa must be a number or None, got nan")
        if not c.semantic_temperature > 0:
            raise VtpruneError(f"dcp_prune semantic_temperature must be > 0, got {c.semantic_temperature}")
        if c.edges < 1 or c.pool_factor < 1:
            raise VtpruneError(f"dcp_prune edges and pool_factor must be >= 1, got {c.edges}, {c.pool_factor}")
        if c.shrinkage < 0 or not c.eps > 0:
            raise VtpruneError(f"dcp_prune needs shrinkage >= 0 and eps > 0, got {c.shrinkage}, {c.eps}")
        if c.recovery not in RECOVERIES:
            raise VtpruneError(f"dcp_prune recovery must be one of {RECOVERIES}, got {c.recovery!r}")
        if not 0.0 <= c.context_cap <= 1.0:
            raise VtpruneError(f"dcp_prune context_cap must be in [0, 1], got {c.context_cap}")
        #: Table key τ_κ was looked up under (None before `bind` when no `calibration_key` was given).
        self.tau_key: str | None = c.calibration_key
        self.tau, self.tau_source = self._resolve_tau(self.tau_key)
        #: Diagnostics only: one list of `CropDecision` per `select` call (per image), newest last.
        self.decisions: deque[list[CropDecision]] = deque(maxlen=MAX_DECISIONS)

    def _resolve_tau(self, key: str | None) -> tuple[float, str]:
        """(τ_κ, source): the user's value, the calibrated one for `key`, or the fallback."""
        if self.config.tau_kappa is not None:
            return float(self.config.tau_kappa), "user"
        calibrated = shipped_tau_kappa(key)
        return (FALLBACK_TAU, "fallback") if calibrated is None else (calibrated, "calibrated")

    def bind(self, num_layers: int) -> None:
        """At `apply`: resolve τ_κ for `calibration_key` or the attached model; warn once per model key when it
        has no calibrated value."""
        super().bind(num_layers)
        if self.config.tau_kappa is not None:
            return
        key = self.config.calibration_key
        if key is None and self.model_name:
            key = calibration_key_of(self.model_name)
        self.tau_key = key
        self.tau, self.tau_source = self._resolve_tau(key)
        seen = key or "<unnamed model>"
        if self.tau_source == "fallback" and seen not in _WARNED:
            _WARNED.add(seen)
            warnings.warn(
                f"dcp_prune: no calibrated tau_kappa for {seen!r}; using the fallback {FALLBACK_TAU} (TATCS then "
                f"fires on an arbitrary share of images). Calibrate it once: vtprune calibrate-dcp --model MODEL "
                f"--images DIR --write (or pass tau_kappa=...)",
                CalibrationWarning,
                stacklevel=4,  # bind <- PruningSession <- vtprune.apply <- the caller
            )

    def record_info(self) -> dict:
        """Run-level facts for `vtprune.last_run(model).method_info`."""
        c = self.config
        return {
            "tau_kappa": self.tau,
            "tau_source": self.tau_source,
            "calibration_key": self.tau_key,
            "recovery": c.recovery,
            "context_cap": c.context_cap,
        }

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("vision"),)

    def signals(self, stage_index: int) -> frozenset[str]:
        return frozenset({"cls_attention", "vision_head_keys", "question_embeddings"})

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        sig = image.signals
        scores = sig["cls_attention"].float()
        keys = F.normalize(sig["vision_head_keys"].float(), dim=1)
        text = sig.get("question_embeddings")
        members = image.view_members()  # per vision view: LLaVA-NeXT base view and each tile
        quotas = largest_remainder_split(k, [len(m) for m in members])
        keep, feats, weights, decisions = [], [], [], []
        for c, (idx, q) in enumerate(zip(members, quotas, strict=True)):
            if q == 0:
                continue
            kp, fp, wp, info = dcp_crop(
                image.features[idx], scores[idx], keys[idx], image.coords[idx], text, q, self.tau, self.config
            )
            keep.append(idx[kp])
            feats.append(fp)
            weights.append(wp)
            decisions.append(CropDecision(c, len(idx), q, **info))
        self.decisions.append(decisions)
        image.memo["record"] = image_record(decisions)
        keep_idx = torch.cat(keep)
        order = keep_idx.argsort()
        new = torch.cat(feats)[order].to(image.features.dtype)
        return KeepPlan(keep_idx[order], new, torch.cat(weights)[order])


_BRANCH = {"acgr": "ACGR", "guard": "ACGR", "tatcs": "TATCS", "all": "all"}


def image_record(decisions: list[CropDecision]) -> dict:
    """One image's `last_run` entry: κ_A and branch ("ACGR" / "TATCS"; several crops: the largest κ_A, "TATCS"
    when any crop's output came from TATCS) plus per-crop details (`guard`: TATCS ran, its κ_T lost)."""
    crops = [
        {
            "crop": d.crop,
            "n": d.n,
            "k": d.k,
            "kappa_a": d.kappa_a,
            "kappa_t": d.kappa_t,
            "branch": _BRANCH[d.branch],
            "guard": d.branch == "guard",
        }  # fmt: skip
        for d in decisions
    ]
    pruned = [c for c in crops if c["branch"] != "all"] or crops
    tatcs_out = [c for c in pruned if c["branch"] == "TATCS"]
    return {
        "kappa_a": max(c["kappa_a"] for c in pruned),
        "branch": "TATCS" if tatcs_out else "ACGR",
        "kappa_t": tatcs_out[0]["kappa_t"] if len(pruned) == 1 and tatcs_out else None,
        "crops": crops,
    }
