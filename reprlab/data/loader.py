"""Batches of uint8 images straight from an in-memory tensor: no workers, no per-sample Python.

The order of an epoch is a function of (seed, epoch) alone, so a run resumed mid-epoch replays exactly the batches
it had not seen. Under DDP each rank takes an interleaved, equal-sized share of the permutation (like
DistributedSampler with drop_last), so every rank runs the same number of steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from reprlab.data.datasets import ImageSet


class Batches:
    """Iterate an :class:`ImageSet` in batches of ``{"images": uint8 (B,C,H,W), "labels": (B,), "index": (B,)}``."""

    def __init__(self, data: ImageSet, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        per_rank = len(data) // world_size if drop_last else -(-len(data) // world_size)
        self.steps_per_epoch = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(data)} images make no full batch of {batch_size} per rank ({world_size} rank(s)); "
                f"lower train.batch_size to at most {max(1, per_rank)}"
            )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> Tensor:
        """This rank's sample indices for ``epoch``."""
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        else:
            order = torch.arange(n)
        if self.drop_last:
            order = order[: n - n % self.world_size]
        elif n % self.world_size:  # pad by repeating, as DistributedSampler does
            order = torch.cat([order, order[: self.world_size - n % self.world_size]])
        return order[self.rank :: self.world_size]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        order = self.order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            batch = {"images": self.data.images[index], "index": index}
            if self.data.labels is not None:
                batch["labels"] = self.data.labels[index]
            yield batch
