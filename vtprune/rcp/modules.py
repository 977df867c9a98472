"""RCP plug-ins (spec rcp.md §A-C): cross-attention pruner, context encoder, Delayed Repair Adapter.

Everything here is pure tensor code on *N-slot* tensors: each sample has N visual slots (its visual tokens in
original order; LLaVA-NeXT: padded to the batch's largest N with `valid` False). The mask route (training)
and the physical route (inference) call the same functions with the same slot tensors, so both give the
same decisions:

- the pruner reads q2v (B, N), the normalised hidden rows V (B, N, d) of the slots (rows of dropped slots
  may hold anything: they are masked out of every sum and of the attention), the normalised question-span
  rows (B, L_q, d) and the cumulative mask c (B, N);
- masks: `training_mask` (Gumbel-sigmoid, straight-through, forward values exactly 0/1) and
  `inference_mask` (θ = 0.5: exactly `z + δ > 0`, so independent of τ_eval); `mask_step` multiplies by c,
  applies the never-empty guard (Our decision) and returns the new cumulative c;
- `drop_rows`: the rows of the slots dropped at this layer are stored once (Ṽ, Our decision), so
  `e_pruned` is route-independent;
- the context encoder turns (c, slot positions, Ṽ) into two b-vectors per sample;
- the DRA modifies only the rows it is told to (generation positions); every other row is bit-identical.

Positions for the context encoder are continuous (row, col) indices into the 24×24 table (`table_coords`:
each token's cell centre in normalised crop coordinates, mapped as `grid_sample(align_corners=False)` maps
them), looked up bilinearly with border clamping; on a 24×24 grid (LLaVA-1.5) they are exact integer rows.

Parameter names inside `RCPPlugins` give the spec's artefact keys: `pruner.{ℓ}.*`, `context.*`, `dra.{r}.*`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .placement import Placement

LOG_FLOOR = 1e-6


def _xavier(linear: nn.Linear, gain: float = 0.1) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight, gain=gain)
    return linear


def _zero(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def _masked_mean(x: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of x over `dim` where valid (x (..., T, ...) and valid broadcastable), 0 where nothing is valid."""
    w = valid.to(x.dtype)
    return (x * w).sum(dim) / w.sum(dim).clamp_min(1.0)


def centred_baseline(q2v: torch.Tensor, c: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """b_i = log(max(q2v_i, 1e-6)) − Σ_j c_j ℓa_j / Σ_j c_j over the kept real slots (spec §B.1).
    q2v, c (B, N); valid (B, N) bool or None.  -> (B, N) fp32."""
    la = q2v.float().clamp_min(LOG_FLOOR).log()
    w = c.float() if valid is None else c.float() * valid.float()
    return la - (w * la).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1e-12)


class CrossAttentionPruner(nn.Module):
    """One pruner (spec §A.1, §B.1-6): keep logits z (B, N) fp32 from the LLM's own q2v plus learned terms."""

    def __init__(
        self,
        hidden_size: int,
        d_prime: int = 512,
        n_queries: int = 16,
        heads: int = 4,
        dropout: float = 0.2,
        query_dropout: float = 0.2,
        beta_init: float = 2.0,
    ):
        super().__init__()
        self.n_queries = n_queries
        self.query_dropout = query_dropout
        self.W_v = _xavier(nn.Linear(hidden_size, d_prime), 0.1)
        self.Q_p = nn.Parameter(torch.randn(n_queries, d_prime) * 0.02)
        self.question_proj = nn.Sequential(nn.Linear(hidden_size, d_prime), nn.LayerNorm(d_prime))
        self.mha = nn.MultiheadAttention(d_prime, heads, batch_first=True)
        self.agg = nn.Linear(n_queries, 1)
        nn.init.constant_(self.agg.weight, 1.0 / n_queries)
        nn.init.zeros_(self.agg.bias)
        self.mlp = nn.Sequential(
            nn.Linear(d_prime, d_prime),
            nn.LayerNorm(d_prime),
            nn.GELU(),
            nn.Dropout(dropout),
            _zero(nn.Linear(d_prime, 1)),
        )
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def forward(
        self,
        q2v: torch.Tensor,
        V: torch.Tensor,
        Hq: torch.Tensor,
        q_valid: torch.Tensor,
        c: torch.Tensor,
        valid: torch.Tensor | None = None,
        query_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q2v (B, N) head/row-mean attention of the question span on the slots; V (B, N, d) normalised slot
        rows; Hq (B, L_q, d) normalised question-span rows, q_valid (B, L_q) bool; c (B, N) cumulative mask;
        valid (B, N) bool real slots (None: all); query_keep (B, n_q) 0/1 query-row dropout mask, applied
        only in training (None: drawn from the torch RNG with p = query_dropout).  -> z (B, N) fp32."""
        valid = torch.ones_like(c, dtype=torch.bool) if valid is None else valid.bool()
        b = centred_baseline(q2v, c, valid)
        dt = self.W_v.weight.dtype  # plug-in weights may differ from the backbone's dtype (fp32 vs bf16)
        Vp = self.W_v(V.to(dt))  # (B, N, d')
        q_mean = _masked_mean(Hq.to(dt), q_valid[..., None], 1)  # (B, d)
        Q = self.Q_p[None] + self.question_proj(q_mean)[:, None]  # (B, n_q, d')
        ignore = (c < 0.5) | ~valid
        _, P_att = self.mha(Q, Vp, Vp, key_padding_mask=ignore, need_weights=True, average_attn_weights=True)
        if self.training and self.query_dropout > 0:
            if query_keep is None:
                query_keep = (torch.rand(P_att.shape[:2], device=P_att.device) >= self.query_dropout).float()
            P_att = P_att * query_keep[..., None].to(P_att.dtype)
        S_a = self.agg(P_att.transpose(1, 2)).squeeze(-1)  # (B, N)
        S_t = self.mlp(Vp).squeeze(-1)  # (B, N)
        return b + S_a.float() + S_t.float() + self.beta.float()


# --- masks ------------------------------------------------------------------------------------------------
def training_mask(z: torch.Tensor, tau: float, noise_on: bool, u: torch.Tensor | None = None) -> torch.Tensor:
    """Gumbel-sigmoid straight-through (spec §B.7).  z (B, N) -> m (B, N): forward values exactly 0/1, gradient
    of σ((z + ε)/τ).  u: uniforms in (0, 1) (B, N) for the logistic noise ε = log u − log(1 − u)."""
    x = z.float()
    if noise_on:
        if u is None:
            u = torch.rand_like(x)
        u = u.float().clamp(1e-6, 1 - 1e-6)
        x = x + (u.log() - (-u).log1p())
    y = torch.sigmoid(x / tau)
    hard = (y > 0.5).to(y.dtype)
    return hard + (y - y.detach())


def inference_mask(z: torch.Tensor, delta: float = 0.0, tau_eval: float = 0.2, theta: float = 0.5) -> torch.Tensor:
    """m = 1[σ((z + δ)/τ_eval) > θ] (spec §B.7); for θ = 0.5 computed as `z + δ > 0` (the same set, exactly
    τ-independent).  -> (B, N) float 0/1."""
    x = z.float() + delta
    keep = x > 0 if theta == 0.5 else torch.sigmoid(x / tau_eval) > theta
    return keep.float()


def mask_step(
    m: torch.Tensor, z: torch.Tensor, c: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """m ← m ⊙ c; never-empty guard (Our decision: if no slot is kept, keep argmax z over the kept slots);
    c ← c ⊙ m (spec §B.7-8).  -> (m, c_new), both (B, N)."""
    m = m * c
    live = c > 0.5 if valid is None else (c > 0.5) & valid.bool()
    if valid is not None:
        m = m * valid.to(m.dtype)
    empty = (m > 0.5).sum(-1) == 0  # (B,)
    if bool(empty.any()):
        best = z.float().masked_fill(~live, float("-inf")).argmax(-1)  # (B,)
        fix = F.one_hot(best, m.shape[-1]).to(m.dtype) * empty[:, None].to(m.dtype)
        m = m + fix * (1 - m.detach())
    return m, c * m


def drop_rows(vdrop: torch.Tensor, c_old: torch.Tensor, c_new: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Store the normalised rows of the slots dropped at this layer (Ṽ, spec §B.9 Our decision).
    vdrop (B, N, d) rows stored so far; c_old/c_new (B, N); V (B, N, d) this layer's rows.  -> (B, N, d)."""
    return vdrop + (c_old - c_new)[..., None].to(V.dtype) * V


# --- context --------------------------------------------------------------------------------------------
def table_coords(
    coords: torch.Tensor, crop: torch.Tensor, grids: list[tuple[int, int]], table: int = 24
) -> torch.Tensor:
    """Continuous (row, col) indices into the `table`×`table` positional table of tokens on their crop grids:
    the cell centre in normalised crop coordinates mapped as grid_sample(align_corners=False) does,
    `(coord + 0.5)·table/size − 0.5` (exactly the integer cell on a 24×24 grid).
    coords (n, 2) (row, col); crop (n,) crop index; grids [(h, w)] per crop.  -> (n, 2) fp32."""
    sizes = torch.tensor(grids, dtype=torch.float32, device=coords.device)[crop]  # (n, 2)
    return (coords.float() + 0.5) * (table / sizes) - 0.5


class ContextEncoder(nn.Module):
    """Shared context encoder (spec §A.2, §B.9): (c, positions, dropped rows) -> e_mask, e_pruned (B, b)."""

    def __init__(self, hidden_size: int, bottleneck: int = 512, grid: int = 24, pos_dim: int = 64):
        super().__init__()
        self.pos_dim = pos_dim
        # spec silent on these two inits (Our decision): the table like nn.Embedding's default N(0, 1), the
        # query like the pruner's learned queries N(0, 0.02²)
        self.P = nn.Parameter(torch.randn(grid, grid, pos_dim))
        self.q = nn.Parameter(torch.randn(pos_dim) * 0.02)
        self.W_m = _xavier(nn.Linear(pos_dim, bottleneck), 0.1)
        self.W_p = _xavier(nn.Linear(hidden_size, bottleneck), 0.1)

    def positional(self, pos: torch.Tensor) -> torch.Tensor:
        """Bilinear lookup (border clamp) at continuous table indices.  pos (B, N, 2) (row, col) -> (B, N, 64)."""
        g = self.P.shape[0]
        p = pos.float().clamp(0, g - 1)
        lo = p.floor().clamp(max=g - 2).long() if g > 1 else p.floor().long()
        w = (p - lo.float()).unsqueeze(-1)  # (B, N, 2, 1)
        hi = (lo + 1).clamp(max=g - 1)
        r0, c0, r1, c1 = lo[..., 0], lo[..., 1], hi[..., 0], hi[..., 1]
        wr, wc = w[..., 0, :], w[..., 1, :]
        P = self.P
        top = P[r0, c0] * (1 - wc) + P[r0, c1] * wc
        bottom = P[r1, c0] * (1 - wc) + P[r1, c1] * wc
        return top * (1 - wr) + bottom * wr

    def forward(
        self, c: torch.Tensor, pos: torch.Tensor, vdrop: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """c (B, N) cumulative mask; pos (B, N, 2) table coordinates (`table_coords`); vdrop (B, N, d) rows
        stored at drop time (zeros for kept slots); valid (B, N) real slots.  -> e_mask (B, b), e_pruned (B, b)."""
        valid = torch.ones_like(c, dtype=torch.bool) if valid is None else valid.bool()
        cf = c.float()
        E = cf[..., None] * self.positional(pos).float()  # (B, N, 64)
        scores = (E @ self.q.float()) / 8.0
        alpha = scores.masked_fill(~valid, float("-inf")).softmax(-1)
        e_mask = self.W_m((alpha[..., None] * E).sum(1))
        dropped = (1 - cf) * valid.float()  # (B, N)
        mean = (dropped[..., None] * vdrop.float()).sum(1) / dropped.sum(-1, keepdim=True).clamp_min(1.0)
        e_pruned = self.W_p(mean.to(self.W_p.weight.dtype))
        return e_mask, e_pruned


# --- repair ---------------------------------------------------------------------------------------------
class DelayedRepairAdapter(nn.Module):
    """FiLM bottleneck applied to generation positions only (spec §A.3, §C)."""

    def __init__(self, hidden_size: int, bottleneck: int = 512, a_init: float = 0.1):
        super().__init__()
        self.W_down = nn.Linear(hidden_size, bottleneck)
        self.W_qry = nn.Linear(hidden_size, bottleneck)
        self.W_gamma = _zero(nn.Linear(bottleneck, bottleneck))
        self.W_beta = _zero(nn.Linear(bottleneck, bottleneck))
        self.W_up = _xavier(nn.Linear(bottleneck, hidden_size), 0.1)
        self.a = nn.Parameter(torch.tensor(float(a_init)))

    def delta(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """The additive repair a·W_up(h2) for rows x (M, d) with context e_mask + e_pruned (M, b).  -> (M, d)."""
        x = x.to(self.W_down.weight.dtype)
        h = F.gelu(self.W_down(x))
        cond = ctx.to(h.dtype) + self.W_qry(x)
        h2 = (1 + self.W_gamma(cond)) * h + self.W_beta(cond)
        return self.a * self.W_up(h2)

    def forward(self, x: torch.Tensor, e_mask: torch.Tensor, e_pruned: torch.Tensor, gate: torch.Tensor):
        """x (B, T, d) decoder-layer output; e_mask/e_pruned (B, b); gate (B, T) bool generation positions.
        -> (B, T, d): x + a·W_up(h2) at gate rows, every other row bit-identical."""
        idx = gate.nonzero(as_tuple=True)
        if idx[0].numel() == 0:
            return x
        rows = x[idx]
        new = rows + self.delta(rows, (e_mask + e_pruned)[idx[0]]).to(rows.dtype)
        return x.index_put(idx, new)


# --- the whole set --------------------------------------------------------------------------------------
@dataclass
class PruneOut:
    """One pruning layer's results on N-slot tensors (all (B, N) unless noted)."""

    z: torch.Tensor  # fp32 keep logits
    m: torch.Tensor  # this layer's mask (after ⊙ c and the guard)
    c: torch.Tensor  # new cumulative mask
    vdrop: torch.Tensor  # (B, N, d) stored rows of every slot dropped so far
    e_mask: torch.Tensor  # (B, b)
    e_pruned: torch.Tensor  # (B, b)


class RCPPlugins(nn.Module):
    """All trainable modules of one RCP configuration: `pruner.{ℓ}`, `context`, `dra.{r}`."""

    def __init__(
        self,
        hidden_size: int,
        placement: Placement,
        *,
        d_prime: int = 512,
        n_queries: int = 16,
        heads: int = 4,
        bottleneck: int = 512,
        grid: int = 24,
        pos_dim: int = 64,
        dropout: float = 0.2,
        query_dropout: float = 0.2,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.placement = placement
        self.dims = dict(
            d_prime=d_prime,
            n_queries=n_queries,
            heads=heads,
            bottleneck=bottleneck,
            grid=grid,
            pos_dim=pos_dim,
            dropout=dropout,
            query_dropout=query_dropout,
        )
        self.pruner = nn.ModuleDict(
            {
                str(ell): CrossAttentionPruner(hidden_size, d_prime, n_queries, heads, dropout, query_dropout)
                for ell in placement.pruning_layers
            }
        )
        self.context = ContextEncoder(hidden_size, bottleneck, grid, pos_dim)
        self.dra = nn.ModuleDict(
            {str(r): DelayedRepairAdapter(hidden_size, bottleneck) for r in placement.repair_layers}
        )

    def prune_step(
        self,
        layer: int,
        q2v: torch.Tensor,
        V: torch.Tensor,
        Hq: torch.Tensor,
        q_valid: torch.Tensor,
        c: torch.Tensor,
        vdrop: torch.Tensor,
        pos: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        train: bool = False,
        tau: float = 1.0,
        noise_on: bool = True,
        u: torch.Tensor | None = None,
        query_keep: torch.Tensor | None = None,
        delta: float = 0.0,
        tau_eval: float = 0.2,
        theta: float = 0.5,
        forced: torch.Tensor | None = None,
    ) -> PruneOut:
        """Pruner ℓ + mask + cumulative update + stored rows + context, on N-slot tensors (shapes as in
        `CrossAttentionPruner.forward`; vdrop (B, N, d); pos (B, N, 2)).  train: Gumbel STE mask with
        (tau, noise_on, u); else the inference mask with (delta, tau_eval, theta).  forced (B, N) 0/1: use this
        mask instead of the pruner's decision (z is still computed; replays for route comparisons)."""
        z = self.pruner[str(layer)](q2v, V, Hq, q_valid, c, valid, query_keep)
        if forced is not None:
            raw = forced.float()
        else:
            raw = training_mask(z, tau, noise_on, u) if train else inference_mask(z, delta, tau_eval, theta)
        m, c_new = mask_step(raw, z, c.float(), valid)
        vdrop = drop_rows(vdrop, c.float(), c_new, V)
        e_mask, e_pruned = self.context(c_new, pos, vdrop, valid)
        return PruneOut(z, m, c_new, vdrop, e_mask, e_pruned)

    def repair(self, layer: int, x: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor], gate: torch.Tensor):
        """DRA of repair layer r on its output x (B, T, d) with its source's (e_mask, e_pruned) at gate rows."""
        return self.dra[str(layer)](x, ctx[0], ctx[1], gate)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, **self.dims, **self.placement.to_dict()}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


#: The spec's plug-in widths (d' = b = 512) are for LLaVA-1.5-7B's 4096-wide decoder.
REFERENCE_HIDDEN = 4096
REFERENCE_WIDTH = 512
MIN_WIDTH = 16


def scaled_width(hidden_size: int, heads: int = 4, reference: int = REFERENCE_WIDTH, floor: int = MIN_WIDTH) -> int:
    """Plug-in width (d' or the DRA bottleneck b) proportional to the decoder width d (Amended 2026-12, issue 22):
    `reference · d / 4096` rounded to a multiple of the pruner's `heads`, at least `floor` (Our decision: 16, so
    each of the 4 heads keeps 4 dimensions).  d = 4096 -> 512 (the spec),
    3584 (Qwen2.5-VL-7B) -> 448, 160 -> 20, 64 -> 16."""
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden size must be an int >= 1, got {hidden_size!r}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads!r}")
    raw = reference * hidden_size / REFERENCE_HIDDEN
    width = max(heads, int(round(raw / heads)) * heads)
    low = -(-floor // heads) * heads  # the floor, rounded up to a multiple of heads
    return max(width, low)
