"""Data-parallel training of the built-in model on several CPU processes (`TrainConfig.procs`): the
process-group primitives `train.train` calls (a no-op outside a process group); `parallel_launch.train_parallel`
starts the processes.

A training step's batch is split between `procs` processes (one thread each, gloo over localhost); their
gradients are averaged before the optimiser step, so every process holds the same weights after every step
and the run is the single-process run's arithmetic up to float summation order (Stage B weighs each process's
loss by its share of the batch's answer tokens, so the averaged gradient is exactly the full batch's). Rank 0
evaluates, exports and writes the checkpoints; its stop decisions (time limit, target reached) are broadcast.
Measured on an idle 2-core Xeon (fp32, forward + backward of the 32 x 64 decoder on a 4-image packed share):
one thread 0.74 s; one process with two threads 0.43 s; two one-thread processes 0.77-0.84 s each, i.e. about the
same throughput as two threads. Data parallelism is the better choice where intra-op threading scales badly
(a shared, loaded machine: ../shared/notes/testbed.md measured 12.6 s per step with two threads against 1.06 s
with one), and it spreads the batch over more cores than one process can use well.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every process (no-op outside a process group)."""
    if rank_world()[1] > 1:
        dist.barrier()


def share(rank: int, per: int, items: list) -> list:
    """This rank's contiguous share `items[rank * per:(rank + 1) * per]` of a batch."""
    return items[rank * per:(rank + 1) * per]


def total(value: float) -> float:
    """Sum of `value` over the processes (itself outside a process group)."""
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


@torch.no_grad()
def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its mean over the processes (one flat all-reduce)."""
    _, world = rank_world()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers of `module` to every process."""
    if rank_world()[1] == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


def broadcast_flags(*flags: bool) -> tuple[bool, ...]:
    """Rank 0's values of `flags` on every process (the values themselves outside a process group)."""
    if rank_world()[1] == 1:
        return tuple(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int64)
    dist.broadcast(t, 0)
    return tuple(bool(v) for v in t.tolist())


def broadcast_value(value: float) -> float:
    """Rank 0's `value` on every process (the value itself outside a process group)."""
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t.item())
