"""Batches of uint8 images straight from an in-memory tensor: no workers, no per-sample Python.

The order of an epoch is a function of (seed, epoch) alone, so a run resumed mid-epoch replays exactly the batches
it had not seen. Under DDP each rank takes an interleaved, equal-sized share of the permutation (like
DistributedSampler: ``drop_last`` drops the tail that does not divide evenly, otherwise the head is repeated as
padding), so every rank runs the same number of steps. :func:`epoch_order` and :func:`steps_per_epoch` are the
one implementation of that, shared with the streamed :class:`reprlab.data.stream.FolderBatches`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor

from reprlab.data.datasets import ImageSet

DEVICE_DATA_LIMIT = 2**30  # bytes of uint8 images a CUDA run keeps in GPU memory (no host copies per step)


def shard(order: Tensor, rank: int, world_size: int, drop_last: bool) -> Tensor:
    """This rank's equal share of ``order`` (DistributedSampler's interleaving): ``order[rank::world_size]`` after
    dropping the last ``len % world_size`` items (``drop_last``) or padding with the first ones."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    n = len(order)
    if drop_last:
        order = order[: n - n % world_size]
    elif n % world_size:
        pad = world_size - n % world_size
        order = torch.cat([order, order.repeat(-(-pad // max(n, 1)))[:pad]])
    return order[rank::world_size]


def epoch_order(n: int, shuffle: bool, drop_last: bool, seed: int, epoch: int, rank: int,
                world_size: int) -> Tensor:
    """This rank's item indices for ``epoch`` of a dataset of ``n`` items: a permutation seeded by (seed, epoch)
    (or ``arange``), then :func:`shard`."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    else:
        order = torch.arange(n)
    return shard(order, rank, world_size, drop_last)


def steps_per_epoch(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    """Steps of one epoch on every rank; an error naming the largest batch size that works when there are none."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_rank = n // world_size if drop_last else -(-n // world_size)
    steps = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
    if steps == 0:
        raise ValueError(f"{n} images make no full batch of {batch_size} per rank ({world_size} rank(s)); "
                         f"lower train.batch_size to at most {max(1, per_rank)}")
    return steps


class Batches:
    """Iterate an :class:`ImageSet` in batches of ``{"images": uint8 (B,C,H,W), "labels": (B,), "index": (B,)}``.

    ``index`` is each image's position in ``data`` (on the CPU); images and labels are on the device of ``data``
    (see :meth:`to`)."""

    def __init__(self, data: ImageSet, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.data, self.batch_size, self.shuffle, self.drop_last = data, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = steps_per_epoch(len(data), batch_size, world_size, drop_last)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def to_device(self, device: torch.device) -> Batches:
        """On CUDA a dataset of at most ``DEVICE_DATA_LIMIT`` bytes is served from GPU memory; else as it is."""
        if torch.device(device).type == "cuda" and self.data.images.nbytes <= DEVICE_DATA_LIMIT:
            return self.to(device)
        return self

    def to(self, device: torch.device | str) -> Batches:
        """The same batches served from ``device`` (e.g. a whole small dataset on the GPU: no host copies)."""
        device = torch.device(device)
        if self.data.images.device == device:
            return self
        moved = copy.copy(self)
        labels = self.data.labels.to(device) if self.data.labels is not None else None
        moved.data = ImageSet(self.data.images.to(device), labels, self.data.classes)
        return moved

    def order(self, epoch: int) -> Tensor:
        """This rank's sample indices for ``epoch``."""
        return epoch_order(len(self.data), self.shuffle, self.drop_last, self.seed, epoch, self.rank,
                           self.world_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        order = self.order(epoch)
        device = self.data.images.device
        for step in range(start_step, self.steps_per_epoch):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            on_device = index.to(device, non_blocking=True)
            batch = {"images": self.data.images[on_device], "index": index}
            if self.data.labels is not None:
                batch["labels"] = self.data.labels[on_device]
            yield batch
