"""ResPrune (arXiv 2603.21105): text-conditioned subspace reconstruction (spec resprune.md).

Step A — text relevance `w` (N,): `c_ik = cos(v_i, t_k)` between the visual tokens V (N, d) (projector /
merger outputs, LLM input space) and the question nouns' mean sub-word input embeddings T (n_nouns, d)
(engine signal `noun_embeddings`, built with `vtprune.text.question_nouns`); `r_i = max_k c_ik`, min–max
normalised over the image (range < 1e-6 → r ≡ 1); `w_i = max(r_i, floor)^α`. No nouns (or α = 0): w ≡ 1.
The nouns come from the user question with its answer-format instruction removed
(`vtprune.text.instructions`), tagged by spaCy `en_core_web_sm` when installed, else by the built-in
rule-based tagger (`vtprune.text.nouns`). `select` records per image, in `ImageTokens.memo["record"]`
(→ `vtprune.last_run(model).samples[b].method_info`): {"noun_extractor": "spacy" | "rules", "nouns": [...],
"question": the text tagged}; with α = 0: {"noun_extractor": None, "nouns": []}.

Step B — greedy residual-energy subspace expansion (pivoted Gram–Schmidt, fp32): residuals R = V,
energies e = ‖R_i‖²; each step picks `j = argmax w·e` over unpicked tokens (ties → lower index), adds the
direction q = R_j/‖R_j‖, deflates every residual (R −= (R q) qᵀ, e −= (R q)²) and recomputes e exactly
every `refresh` steps. When the pick's energy is ≤ rank_tol·max‖v‖² (span exhausted, K > rank V) the
remaining slots are filled with unpicked tokens in descending w·‖v‖² order. The step gain w_j·e_j is the
greedy log-det gain (as its log) of a DPP with kernel L = diag(√w)·VVᵀ·diag(√w).

Step C — keep V[keep_idx] (ascending), no merging; positions are the engine's (`keep` by default).
One selection per image: on LLaVA-NeXT over base view + valid tiles (the engine drops newlines), on
Qwen2.5-VL per image / per video as the engine presents it.

Numerical choices inside the spec's "Our decision" safeguards: the direction q and the rank test use the
pick's exact residual norm ‖R_j‖ (√e_j in exact arithmetic; the tracked e_j drifts by a few ulps of ‖v‖²
per step, which would both de-normalise q and blur the 1e-6 rank test). The loop has no host
synchronisation (an exhausted step applies q = 0 and is overwritten by the fill rule after the loop), so
it can be captured in a CUDA graph; `refresh=0` disables the exact refresh.

Cost: K steps of one mat-vec and one rank-1 update, ≈ 2·K·N·d MACs (4.5·10⁸ at K = 192, N = 576,
d = 4096); Step A is one (N, d)×(d, n_nouns) product. `residual_greedy_batched` runs B samples in one
loop of max K steps with `bmm` and per-sample masks for variable N and K.

Default path (measured, d = 4096, one CPU thread, niced, next to a busy core; ms, best of 2):
| N, K | gram | batched (B = 1) | blocked |
|---|---|---|---|
| 576, 16 / 64 / 192 | 17 / 44 / 188 | 36 / 79 / 235 | 17 / 52 / 131 |
| 2880, 16 / 64 / 192 | 173 / 309 / 1211 | 342 / 789 / 2427 | 133 / 450 / 1518 |
With B = 1 the batched loop is 1.3–2.6× slower than `residual_greedy_gram` at every size, so on CPU every
image runs `residual_greedy_gram`; on accelerators `select_batch` runs all images of a forward in one batched
loop (`residual_greedy_blocked` for a single image), where per-image loops are launch-bound (BENCHMARKS.md, GPU).
All give identical keep sets (tests/test_resprune_nouns.py, tests/test_select_batch.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import VtpruneError
from ..text import extract_nouns
from . import register
from .base import ImageTokens, KeepPlan, MethodConfig, PruningMethod, Stage, option

_TINY = 1e-30


@dataclass
class ResPruneConfig(MethodConfig):
    #: Exponent of the relevance modulation g(r) = r^α (0: no text conditioning, no tokenizer needed).
    alpha: float = option(1.0, ge=0.0)
    #: Floor of the normalised relevance before the exponent.
    relevance_floor: float = option(0.05, ge=0.0, le=1.0)
    #: Span exhausted when the pick's residual energy is ≤ rank_tol · max_i ‖v_i‖².
    rank_tol: float = option(1e-6, ge=0.0, lt=1.0)
    #: Exact recomputation of the energies every `refresh` steps (0: never).
    refresh: int = option(32, ge=0)


def text_relevance(
    V: torch.Tensor, noun_emb: torch.Tensor | None, alpha: float = 1.0, floor: float = 0.05
) -> torch.Tensor:
    """Relevance weights `w = max(minmax(max_k cos(v_i, t_k)), floor)^α` in fp32.

    V (N, d), noun_emb (n_nouns, d) or None -> w (N,). No nouns or α = 0 -> ones.
    """
    n, d = V.shape
    if alpha == 0 or noun_emb is None or noun_emb.numel() == 0:
        return torch.ones(n, dtype=torch.float32, device=V.device)
    if noun_emb.dim() != 2 or noun_emb.shape[1] != d:
        raise VtpruneError(f"resprune: noun_embeddings must be (n_nouns, {d}), got {tuple(noun_emb.shape)}")
    v = F.normalize(V.float(), dim=1)
    t = F.normalize(noun_emb.to(V.device, torch.float32), dim=1)
    r_raw = (v @ t.T).max(dim=1).values  # (N,)
    lo, span = r_raw.min(), r_raw.max() - r_raw.min()
    flat = span < 1e-6  # no host sync: r ≡ 1 when the range is below 1e-6
    r = torch.where(flat, torch.ones_like(r_raw), (r_raw - lo) / torch.where(flat, 1.0, span))
    return r.clamp(min=floor).pow(alpha)


def _energy(R: torch.Tensor) -> torch.Tensor:
    """Squared row norms over the last dimension, fp32.  (..., N, d) -> (..., N)."""
    return torch.linalg.vector_norm(R, dim=-1).square()


def residual_greedy(
    V: torch.Tensor,
    w: torch.Tensor,
    k: int,
    rank_tol: float = 1e-6,
    refresh: int = 32,
    *,
    diagnostics: bool = False,
):
    """Greedy residual-energy subspace expansion of one image (Step B).

    V (N, d), w (N,), k <= N -> (keep (k,) sorted int64, order (k,) pick order int64), plus, when
    `diagnostics`, a dict: "q" (r, d) the orthonormal directions, "energies" (k+1, N) the tracked e before
    the first step and after each step, "scores" (r,) w_j·e_j of each Gram–Schmidt pick at its step (the
    DPP log-det gain is its log), "rank" r = number of Gram–Schmidt picks before the fill rule.
    """
    n, d = V.shape
    if not 0 <= k <= n:
        raise VtpruneError(f"resprune: cannot keep {k} of {n} tokens")
    dev = V.device
    R = V.to(torch.float32, copy=True)
    w = w.to(dev, torch.float32)
    e = _energy(R)
    norms2 = e.clone()
    tol = rank_tol * e.max() if n else torch.zeros((), device=dev)
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    order = torch.empty(k, dtype=torch.long, device=dev)
    ok_all = torch.empty(k, dtype=torch.bool, device=dev)
    if diagnostics:
        qs = torch.zeros(k, d, device=dev)
        energies = [e.clone()]
        scores = torch.empty(k, device=dev)
    for t in range(k):
        score = (w * e).masked_fill(taken, float("-inf"))
        j = score.argmax()  # first maximum: ties to the lower index
        r = R[j]
        ej = r.dot(r)  # exact residual energy of the pick
        ok = ej > tol
        q = r * (ok / ej.clamp(min=_TINY).sqrt())  # q = 0 once the span is exhausted (no host sync)
        coef = R.mv(q)
        R.addr_(coef, q, alpha=-1.0)
        e = (e - coef * coef).clamp(min=0.0)
        if refresh and (t + 1) % refresh == 0:
            e = _energy(R)
        taken[j] = True
        order[t] = j
        ok_all[t] = ok
        if diagnostics:
            qs[t] = q
            energies.append(e.clone())
            scores[t] = score[j]
    rank = int((~ok_all).int().argmax()) if k and not bool(ok_all.all()) else k
    if rank < k:  # fill rule: unpicked tokens by descending w·‖v‖², ties to the lower index
        key = (w * norms2).index_fill(0, order[:rank], float("-inf"))
        order[rank:] = torch.sort(key, descending=True, stable=True).indices[: k - rank]
    keep = order.sort().values
    if not diagnostics:
        return keep, order
    return keep, order, {"q": qs[:rank], "energies": torch.stack(energies), "scores": scores[:rank], "rank": rank}


def residual_greedy_blocked(
    V: torch.Tensor, w: torch.Tensor, k: int, rank_tol: float = 1e-6, refresh: int = 32, block: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step B of one image with delayed (blocked) deflation: the picks of `residual_greedy`, ~2× less memory traffic.

    V (N, d), w (N,), k <= N -> (keep (k,) sorted int64, order (k,) pick order int64).

    `residual_greedy` reads R twice and writes it once per step (mat-vec + rank-1 update). Here R is only
    deflated every `block` steps (and at every refresh point) with one GEMM `R −= Cᵀ Q`; in between, the
    pick's residual is `R[j] − C[:, j]ᵀ Q` and the coefficients of every row are `R q − Cᵀ (Q q)` with the
    block's directions Q (s, d) and coefficients C (s, N), i.e. exactly the current residuals' `R_cur q`
    in exact arithmetic. One read of R per step remains (the mat-vec every energy update needs). Same
    energies, tolerance, refresh points and fill rule; rounding differs from `residual_greedy` by the
    order of the sums only, so the kept sets agree except at exact near-ties of w·e (tested on random
    and rank-deficient inputs in tests/test_perf_selection.py).
    """
    n, d = V.shape
    if not 0 <= k <= n:
        raise VtpruneError(f"resprune: cannot keep {k} of {n} tokens")
    dev = V.device
    R = V.to(torch.float32, copy=True)
    w = w.to(dev, torch.float32)
    e = _energy(R)
    norms2 = e.clone()
    tol = rank_tol * e.max() if n else torch.zeros((), device=dev)
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    order = torch.empty(k, dtype=torch.long, device=dev)
    ok_all = torch.empty(k, dtype=torch.bool, device=dev)
    block = max(1, min(block, k))
    Q = torch.zeros(block, d, device=dev)  # directions of the current block
    C = torch.zeros(block, n, device=dev)  # their coefficients on every row of R (as of the block start)
    s = 0
    for t in range(k):
        score = (w * e).masked_fill(taken, float("-inf"))
        j = score.argmax()  # first maximum: ties to the lower index
        r = R[j] - C[:s, j] @ Q[:s] if s else R[j]  # the pick's current residual (d,)
        ej = r.dot(r)
        ok = ej > tol
        q = r * (ok / ej.clamp(min=_TINY).sqrt())
        coef = R.mv(q)
        if s:
            coef -= C[:s].T.mv(Q[:s].mv(q))
        Q[s], C[s] = q, coef
        s += 1
        e = (e - coef * coef).clamp(min=0.0)
        do_refresh = bool(refresh) and (t + 1) % refresh == 0
        if (s == block or do_refresh) and t + 1 < k:
            R.addmm_(C[:s].T, Q[:s], alpha=-1.0)  # deflate by the block's directions at once
            s = 0
        if do_refresh and t + 1 < k:
            e = _energy(R)
        taken[j] = True
        order[t] = j
        ok_all[t] = ok
    rank = int((~ok_all).int().argmax()) if k and not bool(ok_all.all()) else k
    if rank < k:  # fill rule: unpicked tokens by descending w·‖v‖², ties to the lower index
        key = (w * norms2).index_fill(0, order[:rank], float("-inf"))
        order[rank:] = torch.sort(key, descending=True, stable=True).indices[: k - rank]
    return order.sort().values, order


def residual_greedy_gram(
    V: torch.Tensor,
    w: torch.Tensor,
    k: int,
    rank_tol: float = 1e-6,
    refresh: int = 32,
    batch: int = 64,
    block: int = 32,
    gamma: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step B of one image with Gram columns computed on demand: the picks of `residual_greedy`, CPU path.

    V (N, d), w (N,), k <= N -> (keep (k,) sorted int64, order (k,) pick order int64).

    `residual_greedy` is memory-bound on one CPU thread: every step reads R (N, d) twice and writes it once.
    Here R is deflated only every `block` steps and at every refresh point (one GEMM `R −= Cᵀ Q` with the
    block's directions Q and coefficients C), and the coefficients of a new direction q = r_j/‖r_j‖ come
    from the Gram column of the pick, `(G[:, j] − Cᵀ C[:, j]) / ‖r_j‖` with C[s, i] = v_i·q_s over all
    directions so far — no (N, d) read per step. Gram columns are computed `batch` at a time for the
    current top-scored unpicked tokens (one GEMM pass over V; the next picks are mostly among them). The
    Gram form amplifies rounding by ‖v_j‖/‖r_j‖, so a pick whose residual energy fell below `gamma`·‖v_j‖²
    uses the exact mat-vec `R q − C_blockᵀ (Q_block q)` instead. The pick's residual r_j, the rank test and
    the exact refresh read the deflated R, as in `residual_greedy`. Rounding differs from `residual_greedy`
    by the order of the sums only; the kept sets agree except at exact near-ties of w·e
    (tests/test_perf_selection.py). One host read of the pick per step (the cache lookup).
    """
    n, d = V.shape
    if not 0 <= k <= n:
        raise VtpruneError(f"resprune: cannot keep {k} of {n} tokens")
    dev = V.device
    Vf = V.to(torch.float32)
    R = Vf.clone()
    w = w.to(dev, torch.float32)
    e = _energy(R)
    norms2 = e.clone()
    tol = rank_tol * e.max() if n else torch.zeros((), device=dev)
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    order = torch.empty(k, dtype=torch.long, device=dev)
    ok_all = torch.empty(k, dtype=torch.bool, device=dev)
    C = torch.zeros(k, n, device=dev)  # C[s, i]: coefficient of row i on direction s
    Q = torch.zeros(k, d, device=dev)
    slot = [-1] * n  # token -> index into `where`
    blocks: list[torch.Tensor] = []  # Gram columns, (N, m) each
    where: list[tuple[int, int]] = []
    b0 = 0  # first direction not yet deflated out of R
    for t in range(k):
        score = (w * e).masked_fill(taken, float("-inf"))
        jj = int(score.argmax())  # first maximum: ties to the lower index
        r = R[jj] - C[b0:t, jj] @ Q[b0:t] if t > b0 else R[jj]
        ej = r.dot(r)
        ok = ej > tol
        inv = ok / ej.clamp(min=_TINY).sqrt()
        q = r * inv
        if bool(ej >= gamma * norms2[jj]):
            if slot[jj] < 0:  # Gram columns of the pick and of the next likely picks, one GEMM
                top = torch.topk(score, min(batch, n - t)).indices.tolist()
                cand = [jj] + [i for i in top if slot[i] < 0 and i != jj][: batch - 1]
                blocks.append(Vf @ Vf[cand].T)
                for c, i in enumerate(cand):
                    slot[i] = len(where)
                    where.append((len(blocks) - 1, c))
            bi, ci = where[slot[jj]]
            g = blocks[bi][:, ci]
            coef = (g - C[:t].T.mv(C[:t, jj])) * inv if t else g * inv
        else:
            coef = R.mv(q)
            if t > b0:
                coef -= C[b0:t].T.mv(Q[b0:t].mv(q))
        Q[t], C[t] = q, coef
        e = (e - coef * coef).clamp(min=0.0)
        do_refresh = bool(refresh) and (t + 1) % refresh == 0
        if (t + 1 - b0 == block or do_refresh) and t + 1 < k:
            R.addmm_(C[b0 : t + 1].T, Q[b0 : t + 1], alpha=-1.0)  # deflate the block's directions at once
            b0 = t + 1
            if do_refresh:
                e = _energy(R)
        taken[jj] = True
        order[t] = jj
        ok_all[t] = ok
    rank = int((~ok_all).int().argmax()) if k and not bool(ok_all.all()) else k
    if rank < k:  # fill rule: unpicked tokens by descending w·‖v‖², ties to the lower index
        key = (w * norms2).index_fill(0, order[:rank], float("-inf"))
        order[rank:] = torch.sort(key, descending=True, stable=True).indices[: k - rank]
    return order.sort().values, order


def residual_greedy_batched(
    V: torch.Tensor,
    w: torch.Tensor,
    valid: torch.Tensor,
    k,
    rank_tol: float = 1e-6,
    refresh: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step B for B samples at once (one loop of max K steps, `bmm` mat-vecs and rank-1 updates).

    V (B, N, d), w (B, N), valid (B, N) bool (padding rows False), k (B,) ints with k_b <= valid count ->
    (keep (B, Kmax) sorted per row, order (B, Kmax) pick order), int64, padded with −1 after k_b.
    Row b equals `residual_greedy(V[b, valid[b]], w[b, valid[b]], k_b)` mapped to padded indices.
    """
    bsz, n, d = V.shape
    dev = V.device
    valid = valid.to(dev, torch.bool)
    k = torch.as_tensor(k, dtype=torch.long, device=dev).reshape(bsz)
    if bool((k < 0).any()) or bool((k > valid.sum(1)).any()):
        raise VtpruneError(f"resprune: budgets {k.tolist()} exceed the valid counts {valid.sum(1).tolist()}")
    kmax = int(k.max()) if bsz else 0
    R = V.to(torch.float32, copy=True).masked_fill_(~valid[..., None], 0.0)
    w = w.to(dev, torch.float32)
    e = _energy(R)
    norms2 = e.clone()
    tol = rank_tol * e.max(1).values if n else torch.zeros(bsz, device=dev)  # (B,)
    blocked = ~valid
    rows = torch.arange(bsz, device=dev)
    order = torch.full((bsz, kmax), -1, dtype=torch.long, device=dev)
    ok_all = torch.zeros(bsz, kmax, dtype=torch.bool, device=dev)
    for t in range(kmax):
        active = k > t
        score = (w * e).masked_fill(blocked, float("-inf"))
        j = score.argmax(1)  # (B,) first maximum: ties to the lower index
        r = R[rows, j]  # (B, d)
        ej = (r * r).sum(1)
        ok = active & (ej > tol)
        q = r * (ok / ej.clamp(min=_TINY).sqrt())[:, None]
        coef = torch.bmm(q[:, None, :], R.transpose(1, 2)).squeeze(1)  # (B, N); faster than R @ q on CPU
        R.baddbmm_(coef[:, :, None], q[:, None, :], alpha=-1.0)
        e = (e - coef * coef).clamp(min=0.0)
        if refresh and (t + 1) % refresh == 0:
            e = _energy(R)
        blocked[rows, j] |= active
        order[:, t] = torch.where(active, j, -1)
        ok_all[:, t] = ok
    step = torch.arange(kmax, device=dev)[None]
    in_k = step < k[:, None]
    failed = ~ok_all & in_k
    rank = torch.where(failed.any(1), failed.int().argmax(1), k)  # (B,) first exhausted step
    if bool((rank < k).any()):  # fill rule, vectorised over samples
        before = (step < rank[:, None]) & in_k
        picked = torch.zeros(bsz, n + 1, dtype=torch.bool, device=dev)
        picked.scatter_(1, torch.where(before, order, n), True)
        key = (w * norms2).masked_fill(~valid | picked[:, :n], float("-inf"))
        ranked = torch.sort(key, dim=1, descending=True, stable=True).indices
        fill = ranked.gather(1, (step - rank[:, None]).clamp(min=0).expand(bsz, -1))
        order = torch.where(in_k & ~before, fill, order)
    keep = order.masked_fill(~in_k, n).sort(1).values.masked_fill(~in_k, -1)
    return keep, order


@register
class ResPrune(PruningMethod):
    """Residual-energy subspace reconstruction on the projector outputs, conditioned on question nouns."""

    name = "resprune"
    config_class = ResPruneConfig

    def __init__(self, config: ResPruneConfig | None = None):
        super().__init__(config)
        c = self.config
        if not (math.isfinite(c.alpha) and c.alpha >= 0):
            raise VtpruneError(f"resprune alpha must be a finite number >= 0, got {c.alpha!r}")
        if not 0.0 <= c.relevance_floor <= 1.0:
            raise VtpruneError(f"resprune relevance_floor must lie in [0, 1], got {c.relevance_floor!r}")
        if not 0.0 <= c.rank_tol < 1.0:
            raise VtpruneError(f"resprune rank_tol must lie in [0, 1), got {c.rank_tol!r}")
        if isinstance(c.refresh, bool) or not isinstance(c.refresh, int) or c.refresh < 0:
            raise VtpruneError(f"resprune refresh must be an integer >= 0 (0: never), got {c.refresh!r}")

    def stages(self) -> tuple[Stage, ...]:
        return (Stage("pre_llm"),)

    def signals(self, stage_index: int) -> frozenset[str]:
        # question_text: the method records which nouns (and which extractor) conditioned the selection
        return frozenset({"noun_embeddings", "question_text"}) if self.config.alpha != 0 else frozenset()

    #: the batched loop on CPU too (tests); by default only accelerators batch, where per-image loops are
    #: launch-bound (on CPU the per-image Gram path is faster, module docstring)
    batch_on_cpu: bool = False

    def _relevance(self, image: ImageTokens) -> torch.Tensor:
        """Step A for one image, recording the nouns in its memo.  -> w (N,)."""
        c = self.config
        if c.alpha != 0:
            # the engine embedded `question_nouns(image.question)`; the same cached call names them here
            found = extract_nouns(image.question or "")
            image.memo["record"] = {
                "noun_extractor": found.extractor, "nouns": list(found.words), "question": found.question
            }
        else:
            image.memo["record"] = {"noun_extractor": None, "nouns": []}
        return text_relevance(image.features, image.signals.get("noun_embeddings"), c.alpha, c.relevance_floor)

    def select(self, stage_index: int, image: ImageTokens, k: int) -> KeepPlan:
        c = self.config
        V = image.features
        w = self._relevance(image)
        # same picks as `residual_greedy`: Gram columns on demand on CPU (memory-bound mat-vecs avoided),
        # delayed deflation without host syncs on accelerators
        fast = residual_greedy_gram if V.device.type == "cpu" else residual_greedy_blocked
        keep, _ = fast(V, w, k, c.rank_tol, c.refresh)
        return KeepPlan(keep)

    def select_batch(self, stage_index: int, images: list[ImageTokens], ks: list[int]) -> list[KeepPlan]:
        """All images of a forward in one `residual_greedy_batched` loop (padded to the largest N) on
        accelerators: one loop of max K steps instead of one per image. Same picks as `select` per image."""
        dev = images[0].features.device if images else torch.device("cpu")
        if len(images) < 2 or (dev.type == "cpu" and not self.batch_on_cpu):
            return super().select_batch(stage_index, images, ks)
        c = self.config
        ns = [im.n for im in images]
        V = torch.zeros(len(images), max(ns), images[0].features.shape[1], device=dev)  # (B, N_max, d) fp32
        w = torch.zeros(len(images), max(ns), device=dev)
        valid = torch.zeros(len(images), max(ns), dtype=torch.bool, device=dev)
        for b, im in enumerate(images):
            V[b, : ns[b]] = im.features.float()
            w[b, : ns[b]] = self._relevance(im).to(dev, torch.float32)
            valid[b, : ns[b]] = True
        keep, _ = residual_greedy_batched(V, w, valid, ks, c.rank_tol, c.refresh)
        return [KeepPlan(keep[b, :k]) for b, k in enumerate(ks)]
