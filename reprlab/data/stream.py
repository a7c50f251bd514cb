"""Image folders too large for memory, streamed as uint8 batches decoded in DataLoader worker processes.

:class:`FolderBatches` has the interface of :class:`reprlab.data.loader.Batches` (``len()``, ``batch_size``,
``epoch(epoch, start_step)`` yielding ``{"images": uint8 (B, C, S, S), "labels", "index"}``), so
``engine.fit`` and the device-side augmentations take it unchanged: workers only decode and resize to a fixed
size (cheap, and the same for every epoch); the random augmentation stays batched on the training device.

The order of an epoch is that of ``Batches`` for the same (seed, epoch, rank, world_size), so a resumed run
replays exactly the batches it had not seen and ranks take disjoint, equal-sized shares. Files that cannot be
decoded are dropped from their batch (which is then smaller) and counted; one warning per epoch names them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from reprlab.data.datasets import IMAGE_SUFFIXES, DatasetError


def scan_folder(root: str | Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Image files under ``root`` in sorted order: ``(files, labels, classes)``.

    Class sub-folders (searched recursively) give labels, as ``load_dataset("folder:<dir>")`` does; a flat
    folder gives ``labels=None`` and no classes."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {str(root)!r} does not exist")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:
        files, labels = [], []
        for label, sub in enumerate(subdirs):
            found = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
        classes: list[str] = [d.name for d in subdirs]
        result_labels: list[int] | None = labels
    else:
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        classes, result_labels = [], None
    if not files:
        raise DatasetError(f"image folder {str(root)!r} holds no image files "
                           f"(looked for {sorted(IMAGE_SUFFIXES)})")
    return files, result_labels, classes


def decode_file(path: str | Path, size: int, channels: int = 3) -> Tensor:
    """One image file -> uint8 (channels, size, size): shorter side resized to ``size`` (antialiased), then
    the central square, as ``load_dataset("folder:...")`` prepares images. Raises on unreadable files."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import center_crop, resize

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    image = decode_image(str(path), mode=mode)  # (C, H, W) uint8
    image = resize(image, size, antialias=True)
    return center_crop(image, [size, size])


class _DecodedFiles(torch.utils.data.Dataset):
    """Item i -> (uint8 image or None when unreadable, i); runs inside the DataLoader workers."""

    def __init__(self, files: Sequence[Path], size: int, channels: int) -> None:
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int]:
        try:
            return decode_file(self.files[i], self.size, self.channels), i
        except Exception:  # noqa: BLE001 - any decoder failure means "not an image we can read"
            return None, i


def _collate(items: list[tuple[Tensor | None, int]]) -> tuple[Tensor | None, Tensor, Tensor]:
    """-> (images (B', C, S, S) of the readable files or None, their indices (B',), unreadable indices)."""
    good = [(image, i) for image, i in items if image is not None]
    bad = torch.tensor([i for image, i in items if image is None], dtype=torch.long)
    if not good:
        return None, torch.empty(0, dtype=torch.long), bad
    return torch.stack([image for image, _ in good]), torch.tensor([i for _, i in good]), bad


def epoch_order(n: int, shuffle: bool, drop_last: bool, seed: int, epoch: int, rank: int,
                world_size: int) -> Tensor:
    """This rank's item indices for ``epoch``: the same as ``Batches.order`` for a dataset of n items."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    else:
        order = torch.arange(n)
    if drop_last:
        order = order[: n - n % world_size]
    elif n % world_size:  # pad by repeating, as DistributedSampler does
        order = torch.cat([order, order[: world_size - n % world_size]])
    return order[rank::world_size]


class FolderBatches:
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
            found = [Path(f) for f in files]
            if labels is not None and len(labels) != len(found):
                raise ValueError(f"{len(found)} files but {len(labels)} labels; give one label per file")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.files: list[Path] = found
        self.labels = None if labels is None else torch.as_tensor(list(labels), dtype=torch.int64)
        self.classes = list(classes or [])
        self.image_size, self.batch_size = image_size, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.channels, self.prefetch_factor = num_workers, channels, prefetch_factor
        self.skipped: set[int] = set()
        n = len(self.files)
        per_rank = n // world_size if drop_last else -(-n // world_size)
        self.steps_per_epoch = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} images make no full batch of {batch_size} per rank "
                             f"({world_size} rank(s)); lower the batch size to at most {max(1, per_rank)} "
                             "or set drop_last=False")

    def __len__(self) -> int:
        return self.steps_per_epoch

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
        # a whole batch per worker task: one IPC message per batch, collated where it was decoded
        loader = torch.utils.data.DataLoader(
            _DecodedFiles(self.files, self.image_size, self.channels), batch_sampler=plan,
            num_workers=workers, collate_fn=_collate,
            prefetch_factor=self.prefetch_factor if workers else None)
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
                              f"first: {self.files[new_bad[0]]}", stacklevel=2)
