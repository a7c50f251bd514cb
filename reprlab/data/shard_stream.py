"""Tar shards streamed in sequence: :class:`ShardBatches`, the :class:`reprlab.contracts.BatchSource` that trains
from a :class:`~reprlab.data.shards.ShardSet` (as :class:`reprlab.data.stream.FolderBatches` does from files).

An epoch is the shards in an order seeded by (seed, epoch) (as listed without shuffle), each shard's samples in
the order they lie in it. Rank r takes the r-th of ``world_size`` equal contiguous parts of that sequence (the
tail that does not divide dropped with ``drop_last``, else the front repeated as padding, as loader.shard does)
and cuts its part into contiguous runs of whole batches, one per DataLoader worker (``data.workers``; 0: one run
read in this process). Each worker reads its run front to back (one open shard at a time, offsets increasing)
through a shuffle buffer of ``shuffle_buffer`` samples holding their encoded bytes (about 20 KB each for a 224 px
JPEG, not decoded pixels), and decodes each batch where it reads it. Every sample is read once per epoch, by one
worker of one rank. As the scan knows each sample's offset, a shard may be split between two workers or ranks:
shares are equal whatever the number and sizes of the shards, so DDP ranks run the same number of steps (where
WebDataset hands out whole shards and leaves the rest to ``with_epoch`` / resampling).

Resume mid-epoch is a deterministic replay: the order depends on (seed, epoch, world_size, rank, data.workers,
shuffle_buffer) only, so an epoch resumed at ``start_step`` is rebuilt and its first ``start_step`` batches are
skipped; each worker reads but does not decode the samples of its skipped batches (its shuffle buffer must hold
what it held). With the same world size and data.workers, the batches that follow are those the interrupted run
would have seen, in its order; with others, the epoch is another deterministic order of the same samples.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

from reprlab.data.decode import fit_square, image_from_bytes, preload
from reprlab.data.files import collate
from reprlab.data.loader import steps_per_epoch
from reprlab.data.shards import ShardSet
from reprlab.data.stream import HostStream

SHUFFLE_BUFFER = 1000  # samples per worker (encoded bytes): WebDataset's usual size
T = TypeVar("T")


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """A shuffle buffer: hold up to ``size`` items, emit a random one for each item read past that, then the
    rest in random order. ``size`` <= 1: the items as read."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            k = rng.randrange(len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class _Runs(torch.utils.data.IterableDataset):
    """The runs of one rank's epoch: DataLoader worker w reads ``runs[w]`` (without workers, every run here)
    and yields ``(images or None, index, unreadable index, w, j)`` for its batches j from ``skip[w]`` on."""

    def __init__(self, source: ShardBatches, runs: list[Tensor], skip: list[int], seeds: list[int]) -> None:
        self.shards, self.shard_id, self.offset, self.size = source.shards, source.shard_id, source.offset, source.size
        self.runs, self.skip, self.seeds = runs, skip, seeds
        self.batch_size, self.image_size, self.channels = source.batch_size, source.image_size, source.channels
        self.buffer = source.shuffle_buffer if source.shuffle else 1

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        for w in range(len(self.runs)) if info is None else [info.id]:
            yield from self._run(w)

    def _read(self, run: Tensor) -> Iterator[tuple[int, bytes]]:
        """(index, encoded bytes) of the run's samples in order: one open shard at a time, read front to back."""
        current, f = -1, None
        try:
            for i in run.tolist():
                shard = int(self.shard_id[i])
                if shard != current:
                    if f is not None:
                        f.close()
                    f, current = open(self.shards[shard], "rb"), shard  # noqa: SIM115 - held across samples
                f.seek(int(self.offset[i]))
                yield i, f.read(int(self.size[i]))
        finally:
            if f is not None:
                f.close()

    def _run(self, w: int) -> Iterator[tuple]:
        samples = shuffled(self._read(self.runs[w]), self.buffer, random.Random(self.seeds[w]))
        skipped, batch, j = self.skip[w] * self.batch_size, [], self.skip[w]
        for k, (i, data) in enumerate(samples):
            if k < skipped:
                continue  # read (the buffer needed it), not decoded
            batch.append((i, data))
            if len(batch) == self.batch_size:
                yield (*self._decode(batch), w, j)
                batch, j = [], j + 1
        if batch:
            yield (*self._decode(batch), w, j)

    def _decode(self, batch: list[tuple[int, bytes]]) -> tuple[Tensor | None, Tensor, Tensor]:
        items = []
        for i, data in batch:
            try:
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                items.append((fit_square(image_from_bytes(encoded, self.channels), self.image_size), i))
            except Exception:  # noqa: BLE001 - any decoder failure means "not an image we can read"
                items.append((None, i))
        return collate(items)


class ShardBatches(HostStream):
    """Stream ``{"images": uint8 (B, C, S, S), "labels": (B,), "index": (B,)}`` batches from the tar shards of
    a :class:`ShardSet` (``index``: the position in ``split.files``), read in sequence and decoded in
    ``num_workers`` DataLoader processes. ``skipped`` holds the indices of the images found unreadable."""

    def __init__(self, split: ShardSet, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 2, channels: int = 3,
                 shuffle_buffer: int = SHUFFLE_BUFFER, prefetch_factor: int = 2) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.files, self.labels, self.classes = split.files, split.labels, split.classes
        self.shards = list(dict.fromkeys(member.shard for member in split.files))
        number = {shard: k for k, shard in enumerate(self.shards)}
        self.shard_id = torch.tensor([number[m.shard] for m in split.files], dtype=torch.int32)
        self.offset = torch.tensor([m.offset for m in split.files], dtype=torch.int64)
        self.size = torch.tensor([m.size for m in split.files], dtype=torch.int64)
        order = torch.argsort(self.shard_id, stable=True)  # the samples of each shard, in the order they lie
        self.groups = list(torch.split(order, torch.bincount(self.shard_id, minlength=len(self.shards)).tolist()))
        self.image_size, self.batch_size, self.channels = split.image_size, batch_size, channels
        self.shuffle, self.drop_last, self.seed, self.rank, self.world_size = shuffle, drop_last, seed, rank, world_size
        self.num_workers, self.shuffle_buffer, self.prefetch_factor = num_workers, shuffle_buffer, prefetch_factor
        self.steps_per_epoch = steps_per_epoch(len(self.files), batch_size, world_size, drop_last)
        self.skipped: set[int] = set()

    def shard_order(self, epoch: int) -> Tensor:
        """The shards of ``epoch`` in reading order (seeded by (seed, epoch), the same on every rank)."""
        if not self.shuffle:
            return torch.arange(len(self.shards))
        return torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def runs(self, epoch: int) -> list[Tensor]:
        """This rank's sample indices for ``epoch``, one run per worker, each read in this order (before the
        shuffle buffer): whole batches, the last run ending with the partial batch (without ``drop_last``)."""
        sequence = torch.cat([self.groups[k] for k in self.shard_order(epoch).tolist()])
        n, world, b = len(sequence), self.world_size, self.batch_size
        per = n // world if self.drop_last else -(-n // world)
        part = sequence[torch.arange(self.rank * per, (self.rank + 1) * per) % n]  # padding wraps to the front
        full = len(part) // b
        workers = max(1, self.num_workers)
        counts = [full // workers + (w < full % workers) for w in range(workers)]
        ends = torch.tensor(counts).cumsum(0).mul(b).tolist()
        runs = [part[end - count * b : end] for end, count in zip(ends, counts)]
        if not self.drop_last:
            runs[-1] = torch.cat([runs[-1], part[full * b :]])
        return runs

    def _seeds(self, epoch: int, workers: int) -> list[int]:
        return [((self.seed * 1_000_003 + epoch) * 65_537 + self.rank) * 4_099 + w for w in range(workers)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        """Batches of ``epoch`` from step ``start_step`` on (a replay: see the module); a batch of only
        unreadable images is skipped."""
        runs = self.runs(epoch)
        counts = [-(-len(run) // self.batch_size) for run in runs]
        order = [(w, j) for j in range(max(counts)) for w in range(len(runs)) if j < counts[w]]
        skip = [sum(1 for w_, _ in order[:start_step] if w_ == w) for w in range(len(runs))]
        if self.num_workers:
            preload()  # imported once here, not by every worker of every epoch
        loader = torch.utils.data.DataLoader(
            _Runs(self, runs, skip, self._seeds(epoch, len(runs))), batch_size=None, num_workers=self.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor if self.num_workers else None,
            generator=torch.Generator())  # its seed draw must not advance the global RNG the augmentations use
        pending: dict[tuple[int, int], tuple] = {}
        produced, new_bad = iter(loader), []
        try:
            for key in order[start_step:]:
                while key not in pending:  # workers interleave as the DataLoader polls them: put back in order
                    images, index, bad, w, j = next(produced)
                    pending[(w, j)] = (images, index, bad)
                images, index, bad = pending.pop(key)
                if len(bad):
                    new_bad += [i for i in bad.tolist() if i not in self.skipped]
                    self.skipped.update(bad.tolist())
                if images is None:
                    continue
                batch = {"images": images, "index": index}
                if self.labels is not None:
                    batch["labels"] = self.labels[index]
                yield batch
        finally:
            del produced
            if new_bad:
                warnings.warn(f"skipped {len(new_bad)} unreadable image(s) in epoch {epoch}, first: "
                              f"{', '.join(str(self.files[i]) for i in new_bad[:3])}"
                              f"{', ...' if len(new_bad) > 3 else ''}", stacklevel=2)
