"""MoCo's memory queue of negative keys (He et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprlab import distributed


class MemoryQueue(nn.Module):
    """A FIFO queue of the last ``size`` keys, held in buffers so it is saved and resumed with the method.

    ``queue`` (size, dim) starts as random unit vectors, as MoCo's does (from a fixed ``seed``, so every rank
    starts with the same queue without a broadcast). :meth:`enqueue` overwrites the oldest rows: keys go to rows
    ``pointer, pointer + 1, ...`` modulo ``size`` (wrapping around, so ``size`` need not divide the batch) and
    ``pointer`` (a 0-d long buffer) moves past them; :meth:`ordered` lists the rows oldest first. Under DDP the
    keys of every rank are gathered first (in rank order), so every rank holds the same queue.

    Use ``queue`` as the negatives of the current step, *then* enqueue the step's keys (MoCo's order):
    :func:`reprlab.ssl.losses.infonce_queue_logits` keeps a copy for backward, so the in-place write is safe.
    """

    queue: Tensor
    pointer: Tensor

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"size and dim must be > 0, got {size} and {dim}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, gather: bool = True) -> None:
        """Append ``keys`` (n, dim), from every rank when ``gather`` (no gradient), replacing the oldest rows."""
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must be (n, {self.queue.shape[1]}), got {tuple(keys.shape)}")
        keys = keys.detach()
        keys = distributed.all_gather(keys) if gather else keys  # (N, dim), rank-major
        if keys.shape[0] > self.size:
            raise ValueError(f"{keys.shape[0]} keys (global batch) do not fit a queue of size {self.size}; "
                             f"use a queue_size of at least the global batch size")
        start = int(self.pointer)
        rows = (torch.arange(keys.shape[0], device=self.queue.device) + start) % self.size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.pointer.fill_((start + keys.shape[0]) % self.size)

    def ordered(self) -> Tensor:
        """The queue's rows from the oldest to the newest key (size, dim); a copy."""
        return self.queue.roll(-int(self.pointer), dims=0)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.queue.shape[1]}"
