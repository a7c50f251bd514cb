"""Real multi-process runs for the equivalence tests ("2 ranks = 1 process"): spawn, one gloo process group per
rank, each rank's result back in the parent. Spawned children import the worker's module as ``tests.<name>``, so
the repository root is put on ``sys.path`` (tests/conftest.py does it for the parent)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker: Callable[..., dict], world: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(worker(rank, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(worker: Callable[..., dict], out_dir: str | Path, *args: Any, world: int = 2) -> list[dict]:
    """``worker(rank, *args) -> dict`` (a module-level function) in ``world`` gloo processes; their results."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    mp.spawn(_entry, args=(worker, world, free_port(), str(out_dir), args), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]
