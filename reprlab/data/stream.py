"""Image folders too large for memory, streamed as uint8 batches decoded in DataLoader worker processes.

:class:`FolderBatches` is a :class:`reprlab.contracts.BatchSource` like :class:`reprlab.data.loader.Batches`
(``len()``, ``batch_size``, ``epoch(epoch, start_step)`` yielding ``{"images": uint8 (B, C, S, S), "labels",
"index"}``, ``to_device``), so ``engine.fit`` and the device-side augmentations take it unchanged: workers
only decode and resize to a fixed size (cheap, and the same for every epoch); the random augmentation stays
batched on the training device.

The order of an epoch is that of ``Batches`` for the same (seed, epoch, rank, world_size), so a resumed run
replays exactly the batches it had not seen and ranks take disjoint, equal-sized shares. Files that cannot be
decoded are dropped from their batch (which is then smaller) and counted; one warning per epoch names them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from reprlab.data.datasets import ImageSet
from reprlab.data.decode import preload
from reprlab.data.files import DecodedFiles, FileSet, collate, scan_folder
from reprlab.data.loader import epoch_order, steps_per_epoch


class HostStream:
    """What every streamed batch source shares: batches are decoded on the host in DataLoader workers, so the
    source stays there, and on CUDA its batches come in pinned memory (asynchronous copies)."""

    steps_per_epoch: int
    pin_memory: bool = False

    def __len__(self) -> int:
        return self.steps_per_epoch

    def to_device(self, device: torch.device) -> HostStream:
        """A copy that pins its batches when ``device`` is CUDA."""
        streamed = copy.copy(self)
        streamed.pin_memory = torch.device(device).type == "cuda"
        return streamed


class FolderBatches(HostStream):
    """Stream ``{"images": uint8 (B, C, image_size, image_size), "labels": (B,), "index": (B,)}`` batches from
    image files, decoded and resized in ``num_workers`` DataLoader processes (0: in this process).

    ``root``: a folder (class sub-folders are labels; a flat folder is unlabeled), or pass ``files`` (and
    optionally ``labels``) instead. ``index`` is the position in ``self.files``. ``skipped`` holds the indices
    of files found unreadable so far.
    """

    def __init__(self, root: str | Path | None = None, image_size: int = 64, batch_size: int = 256,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, channels: int = 3,
                 files: Sequence[str | Path] | None = None, labels: Sequence[int] | None = None,
                 classes: Sequence[str] | None = None, prefetch_factor: int = 2) -> None:
        if (root is None) == (files is None):
            raise ValueError("give exactly one of root (a folder) and files (a list of image paths)")
        if root is not None:
            found, labels, classes = scan_folder(root)
        else:
            found = [Path(f) if isinstance(f, str) else f for f in files]  # Paths, or tar members (shards)
            if labels is not None and len(labels) != len(found):
                raise ValueError(f"{len(found)} files but {len(labels)} labels; give one label per file")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.files: list[Path] = found
        self.labels = None if labels is None else torch.as_tensor(
            labels if isinstance(labels, Tensor) else list(labels), dtype=torch.int64)
        self.classes = list(classes or [])
        self.image_size, self.batch_size = image_size, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.channels, self.prefetch_factor = num_workers, channels, prefetch_factor
        self.skipped: set[int] = set()
        self.steps_per_epoch = steps_per_epoch(len(self.files), batch_size, world_size, drop_last)

    def order(self, epoch: int) -> Tensor:
        """This rank's file indices for ``epoch`` (the first ``len(self) * batch_size`` are used)."""
        return epoch_order(len(self.files), self.shuffle, self.drop_last, self.seed, epoch, self.rank,
                           self.world_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        """Batches of ``epoch`` from step ``start_step`` on; a batch of only unreadable files is skipped."""
        order = self.order(epoch)
        plan = [order[step * self.batch_size : (step + 1) * self.batch_size].tolist()
                for step in range(start_step, self.steps_per_epoch)]
        workers = self.num_workers
        if workers:
            preload()  # imported once here, not by every worker of every epoch
        # a whole batch per worker task: one IPC message per batch, collated where it was decoded
        loader = torch.utils.data.DataLoader(
            DecodedFiles(self.files, self.image_size, self.channels), batch_sampler=plan,
            num_workers=workers, collate_fn=collate, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None,
            generator=torch.Generator())  # its seed draw must not advance the global RNG the augmentations use
        new_bad: list[int] = []
        try:
            for images, index, bad in loader:
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
            if new_bad:
                warnings.warn(f"skipped {len(new_bad)} unreadable image file(s) in epoch {epoch}, "
                              f"first: {', '.join(str(self.files[i]) for i in new_bad[:3])}"
                              f"{', ...' if len(new_bad) > 3 else ''}", stacklevel=2)


def ordered_batches(split: ImageSet | FileSet, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """Every image of ``split`` once, in order, as ``{"images", "index", "labels" (when labeled)}`` batches:
    slices of a decoded split, or a streamed one decoded in its workers (unreadable files left out: ``index``
    says which images a batch holds). For evaluation (accuracy, features), never shuffled."""
    if isinstance(split, FileSet):
        stream = FolderBatches(files=split.files, labels=split.labels, classes=split.classes,
                               image_size=split.image_size, batch_size=min(batch_size, max(len(split), 1)),
                               shuffle=False, drop_last=False, num_workers=split.workers)
        yield from stream.epoch(0)
        return
    for start in range(0, len(split), batch_size):
        batch = {"images": split.images[start : start + batch_size],
                 "index": torch.arange(start, min(start + batch_size, len(split)))}
        if split.labels is not None:
            batch["labels"] = split.labels[start : start + batch_size]
        yield batch
