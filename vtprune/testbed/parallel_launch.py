"""Start `TrainConfig.procs` data-parallel training processes (gloo on localhost), each running `train.train`
with the process-group primitives of `parallel.py`. Kept apart from `parallel.py` so that `train` can import
those primitives without an import cycle."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from .train import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str, config, device: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(hours=2))
    try:
        train(out, config, device=device, progress=False,
              log=(lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None))
    finally:
        dist.destroy_process_group()


def train_parallel(out: str | Path, config, device: str = "cpu") -> None:
    """Run `train.train(out, config)` in `config.procs` data-parallel processes (gloo on localhost); returns
    when all have finished. The trained model is in `out/model` as with a single process."""
    import torch.multiprocessing as mp

    if config.procs < 2:
        raise ValueError(f"train_parallel needs procs >= 2, got {config.procs}")
    for name in ("batch_a", "batch_b", "single_batch"):
        if getattr(config, name) % config.procs:
            raise ValueError(f"{name}={getattr(config, name)} is not divisible by procs={config.procs}")
    mp.spawn(_worker, args=(config.procs, _free_port(), str(out), config, device), nprocs=config.procs, join=True)
