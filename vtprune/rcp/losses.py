"""RCP losses (spec rcp.md §E), fp32: L = λ_task·L_task + λ_repair·L_repair + λ_sparse·L_sparse.

- `task_loss`: token cross-entropy on answer + EOS, mean per sample, then over the batch.
- `repair_loss`: per repair layer the generation-position states of the *global* batch are stacked
  (`gather_rows`: a differentiable all-gather across processes, a no-op with one process) into H_p
  (student, after the DRA) and H_o (teacher); L_r = mean_d (μ_p − μ_o)² + α·mean_d (v_p − v_o)² with
  v = mean(h²) − μ² (clamped ≥ 0); averaged over repair layers.  Amended 2026-12 (`norm="teacher_std"`, the
  default): both row sets are first divided by the teacher's per-dimension standard deviation over the stacked
  rows (detached, + 1e-6), so the loss has the same scale on any model (λ_repair = 3 means the same thing on
  LLaVA-1.5-7B and on the built-in model); `norm="none"` is the reference's loss on the raw states.
- `sparsity_loss`: |r̄ − r*| with r̄ = (ℓ_1 + Σ_k n_k r_k)/L (`Placement.layer_average`).

Under DDP every rank computes the same global moments; `gather_rows`' backward sums the row gradients
over the ranks, and DDP averages parameter gradients over the ranks, so the parameters receive exactly
the gradient of the one global loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, targets: torch.Tensor, sample: torch.Tensor, batch_size: int) -> torch.Tensor:
    """logits (M, V) at the generation positions, targets (M,) token ids, sample (M,) sample index of each
    row.  -> scalar: per-sample mean token CE, averaged over the samples that have targets."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (M,)
    total = torch.zeros(batch_size, device=ce.device).index_add(0, sample, ce)
    count = torch.zeros(batch_size, device=ce.device).index_add(0, sample, torch.ones_like(ce))
    has = count > 0
    return (total[has] / count[has]).mean()


class _GatherRows(torch.autograd.Function):
    """All-gather of a variable number of rows (M_r, d) per rank -> (Σ M_r, d); backward: sum the incoming
    gradients over the ranks (all-reduce) and return this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group=None):
        world = dist.get_world_size(group)
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n, group=group)
        counts = [int(c.item()) for c in counts]
        width = max(counts)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        rank = dist.get_rank(group)
        ctx.group, ctx.counts, ctx.rank = group, counts, rank
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather of rows across processes; the identity without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    return _GatherRows.apply(x, group)


REPAIR_NORMS = ("teacher_std", "none")
STD_EPS = 1e-6


def check_repair_norm(norm: str) -> str:
    """`norm` if it is a known repair normalisation, else a one-line ValueError naming the accepted ones."""
    if norm not in REPAIR_NORMS:
        raise ValueError(f"repair_norm must be one of {', '.join(REPAIR_NORMS)}, got {norm!r}")
    return norm


def teacher_scale(teacher: torch.Tensor) -> torch.Tensor:
    """Per-dimension standard deviation of the teacher rows (T_o, d) over the rows (population, two-pass), + 1e-6,
    detached.  -> (d,) fp32."""
    ho = teacher.detach().float()
    return ho.std(0, correction=0) + STD_EPS


def moment_loss(
    student: torch.Tensor, teacher: torch.Tensor, alpha: float = 3.0, norm: str = "teacher_std"
) -> torch.Tensor:
    """Mean/variance matching of two row sets (T_p, d) and (T_o, d).  norm: "teacher_std" divides both by
    `teacher_scale(teacher)` first (spec amendment 2026-12), "none" uses the raw states.  -> scalar (fp32)."""
    hp, ho = student.float(), teacher.float()
    if check_repair_norm(norm) == "teacher_std":
        scale = teacher_scale(ho)
        hp, ho = hp / scale, ho / scale
    mu_p, mu_o = hp.mean(0), ho.mean(0)
    v_p = (hp.square().mean(0) - mu_p.square()).clamp_min(0)
    v_o = (ho.square().mean(0) - mu_o.square()).clamp_min(0)
    return (mu_p - mu_o).square().mean() + alpha * (v_p - v_o).square().mean()


def repair_loss(
    student: dict[int, torch.Tensor],
    teacher: dict[int, torch.Tensor],
    alpha: float = 3.0,
    gather: bool = True,
    norm: str = "teacher_std",
) -> torch.Tensor:
    """student/teacher: repair layer -> (M, d) generation-position rows of this process; gathered across
    processes when `gather` (the teacher's std is then taken over the global rows, the same on every rank).
    -> scalar, the mean of `moment_loss(…, norm)` over the repair layers."""
    check_repair_norm(norm)
    losses = []
    for r in sorted(student):
        hp, ho = student[r], teacher[r].detach()
        if gather:
            hp, ho = gather_rows(hp), gather_rows(ho)
        losses.append(moment_loss(hp, ho, alpha, norm))
    return torch.stack(losses).mean()


def sparsity_loss(r_bar: torch.Tensor, r_target: float) -> torch.Tensor:
    """|r̄ − r*|."""
    return (r_bar.float() - r_target).abs()
