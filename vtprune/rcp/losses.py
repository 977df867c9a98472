"""RCP losses (spec rcp.md §E), fp32: L = λ_task·L_task + λ_repair·L_repair + λ_sparse·L_sparse.

- `task_loss`: token cross-entropy on answer + EOS, mean per sample, then over the batch.
- `repair_loss`: per repair layer the generation-position states of the *global* batch are stacked
  (`gather_rows`: a differentiable all-gather across processes, a no-op with one process) into H_p
  (student, after the DRA) and H_o (teacher); L_r = mean_d (μ_p − μ_o)² + α·mean_d (v_p − v_o)² with
  v = mean(h²) − μ² (clamped ≥ 0); averaged over repair layers.
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


def moment_loss(student: torch.Tensor, teacher: torch.Tensor, alpha: float = 3.0) -> torch.Tensor:
    """Mean/variance matching of two row sets (T_p, d) and (T_o, d).  -> scalar (fp32)."""
    hp, ho = student.float(), teacher.float()
    mu_p, mu_o = hp.mean(0), ho.mean(0)
    v_p = (hp.square().mean(0) - mu_p.square()).clamp_min(0)
    v_o = (ho.square().mean(0) - mu_o.square()).clamp_min(0)
    return (mu_p - mu_o).square().mean() + alpha * (v_p - v_o).square().mean()


def repair_loss(
    student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], alpha: float = 3.0, gather: bool = True
) -> torch.Tensor:
    """student/teacher: repair layer -> (M, d) generation-position rows of this process; gathered across
    processes when `gather`.  -> scalar, the mean of `moment_loss` over the repair layers."""
    losses = []
    for r in sorted(student):
        hp, ho = student[r], teacher[r].detach()
        if gather:
            hp, ho = gather_rows(hp), gather_rows(ho)
        losses.append(moment_loss(hp, ho, alpha))
    return torch.stack(losses).mean()


def sparsity_loss(r_bar: torch.Tensor, r_target: float) -> torch.Tensor:
    """|r̄ − r*|."""
    return (r_bar.float() - r_target).abs()
