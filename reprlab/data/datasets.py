"""Datasets as uint8 tensors held in memory (decoded once, augmented later on the training device), or, for image
files larger than ``memory_limit_gb`` decoded, as :class:`~reprlab.data.files.FileSet` splits that are streamed.

Names: ``digits`` (scikit-learn's bundled 8x8 digits, the offline default), ``npz:<dir>`` (train.npz and optional
val.npz / test.npz with uint8 NHWC ``images``, int ``labels``, ``classes``), ``folder:<dir>`` (class sub-folders,
a flat folder, or split folders train/ val/ test/: reprlab.data.files), ``list:<file>`` (a .csv / .txt file
list), ``shards:<dir|glob|pattern>`` (WebDataset-style tar shards: reprlab.data.shards), and the torchvision
datasets ``cifar10``, ``cifar100``, ``stl10``, ``mnist``, ``fashion_mnist`` (downloaded only when
``download=True``). Missing val / test splits are carved from train (stratified, seeded).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reprlab.data.files import (  # noqa: F401 - DatasetError, IMAGE_SUFFIXES, decode_file, scan_folder: re-exported
    IMAGE_SUFFIXES,
    DatasetError,
    FileSet,
    decode_all,
    decode_file,
    scan_folder,
    scan_source,
)


@dataclass
class ImageSet:
    """Images (N, C, H, W) uint8, labels (N,) int64 or None, and class names."""

    images: Tensor
    labels: Tensor | None
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DatasetError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: Tensor) -> ImageSet:
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, self.classes)


Split = ImageSet | FileSet  # decoded in memory, or image files to stream


@dataclass
class DatasetSplits:
    """The splits of a dataset; ``origin`` says where each came from (the dataset, or carved from train),
    ``unreadable`` lists the files set aside, ``memory`` how the images are held."""

    train: Split
    val: Split | None
    test: Split | None
    name: str
    origin: dict[str, str] = field(default_factory=dict)
    unreadable: list[Path] = field(default_factory=list)
    memory: str = "in memory"
    shards: dict[str, int] = field(default_factory=dict)  # tar shards per split the dataset has

    @property
    def labeled(self) -> bool:
        return self.train.labels is not None

    @property
    def streamed(self) -> bool:
        return isinstance(self.train, FileSet)

    def summary(self) -> str:
        """One line: images (and classes) per split and where each split came from, unreadable files, memory."""
        parts = []
        for split in ("train", "val", "test"):
            images = getattr(self, split)
            if images is None:
                parts.append(f"no {split} split" + (f" ({self.origin[split]})" if split in self.origin else ""))
                continue
            classes = "" if images.labels is None else f" in {len(images.labels.unique())} classes"
            shards = self.shards.get(split)  # tar shards: how many hold the dataset's own split
            classes += f" from {shards} tar shard{'s' * (shards != 1)}" if shards else ""
            origin = f" ({self.origin[split]})" if split in self.origin and split != "train" else ""
            parts.append(f"{split} {len(images)} image{'s' * (len(images) != 1)}{classes}{origin}")
        line = f"{self.name}: " + ", ".join(parts) + ("" if self.labeled else ", unlabeled")
        if self.unreadable:
            shown = ", ".join(str(p) for p in self.unreadable[:3]) + (", ..." if len(self.unreadable) > 3 else "")
            line += f"; {len(self.unreadable)} unreadable file(s) skipped: {shown}"
        return f"{line}; {self.memory}"


def stratified_split(labels: Tensor | None, n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic split of ``range(n)`` into (keep, held_out) with ``fraction`` of each class held out."""
    generator = torch.Generator().manual_seed(seed)
    if labels is None:
        perm = torch.randperm(n, generator=generator)
        n_out = int(round(n * fraction))
        return perm[n_out:].sort().values, perm[:n_out].sort().values
    keep, out = [], []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_out = int(round(len(idx) * fraction))
        out.append(idx[:n_out])
        keep.append(idx[n_out:])
    return torch.cat(keep).sort().values, torch.cat(out).sort().values


def hold_out(split: Split, fractions: dict[str, float], seed: int) -> tuple[Split, dict[str, Split]]:
    """Carve held-out splits from ``split``: for each ``{name: fraction}`` in order (val, then test),
    ``max(1, round(fraction * n))`` images of every class of n images (of all images when unlabeled), seeded.
    The first split is the one :func:`stratified_split` holds out (where it holds out any), so adding a test
    split leaves val as it was. A class too small for train and every split is an error naming it and the fix."""
    generator = torch.Generator().manual_seed(seed)
    labels = split.labels
    groups = ([torch.arange(len(split))] if labels is None
              else [(labels == c).nonzero().flatten() for c in labels.unique(sorted=True)])
    keep: list[Tensor] = []
    held: dict[str, list[Tensor]] = {name: [] for name in fractions}
    for group in groups:
        idx = group[torch.randperm(len(group), generator=generator)]
        start = 0
        for name, fraction in fractions.items():
            take = max(1, int(round(len(idx) * fraction)))
            held[name].append(idx[start : start + take])
            start += take
        if start >= len(idx):
            cls = int(labels[group[0]]) if labels is not None else None
            what = "the dataset" if cls is None else (
                f"class {split.classes[cls] if cls < len(split.classes) else cls!r}")
            asked = ", ".join(f"data.{name}_fraction={fraction}" for name, fraction in fractions.items())
            raise DatasetError(f"{what} has {len(idx)} image(s): too few to keep one in train and hold one out for "
                               f"each of {asked}; add images, or set a fraction to 0 (no such split)")
        keep.append(idx[start:])
    return (split.subset(torch.cat(keep).sort().values),
            {name: split.subset(torch.cat(parts).sort().values) for name, parts in held.items()})


def per_class_subset(labels: Tensor, per_class: int | None = None, fraction: float | None = None,
                     seed: int = 0) -> Tensor:
    """Indices of a stratified, seeded subset: ``per_class`` images per class, or ``fraction`` of each class.

    Raises when a class would be left with no image (name the class and the fix)."""
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of labels_per_class and label_fraction")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in labels.unique(sorted=True):
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        take = per_class if per_class is not None else int(round(len(idx) * fraction))
        if take < 1:
            raise ValueError(
                f"label_fraction={fraction} leaves class {int(cls)} with no labeled image ({len(idx)} available); "
                f"use a larger label_fraction or labels_per_class >= 1"
            )
        chosen.append(idx[:take])
    return torch.cat(chosen).sort().values


def _nhwc_to_tensor(images: np.ndarray) -> Tensor:
    if images.ndim == 3:  # (N, H, W) greyscale
        images = images[..., None]
    if images.dtype != np.uint8:
        raise DatasetError(f"expected uint8 images, got {images.dtype}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _load_digits() -> dict[str, ImageSet]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    full = ImageSet(_nhwc_to_tensor(images), torch.as_tensor(digits.target, dtype=torch.int64),
                    [str(c) for c in digits.target_names])
    # digits has no test split: hold out 20% deterministically, stratified
    train_idx, test_idx = stratified_split(full.labels, len(full), 0.2, seed=12345)
    return {"train": full.subset(train_idx), "test": full.subset(test_idx)}


def _load_npz(directory: Path) -> dict[str, ImageSet]:
    if not directory.is_dir():
        raise DatasetError(f"npz dataset folder {str(directory)!r} does not exist")
    if not (directory / "train.npz").is_file():
        raise DatasetError(f"npz dataset folder {str(directory)!r} has no train.npz (expected train.npz, "
                           f"optional val.npz / test.npz with uint8 NHWC 'images', 'labels', 'classes')")
    splits = {}
    for split in ("train", "val", "test"):
        path = directory / f"{split}.npz"
        if not path.is_file():
            continue
        with np.load(path, allow_pickle=False) as f:
            missing = {"images"} - set(f.files)
            if missing:
                raise DatasetError(f"{path} lacks the array 'images' (has {sorted(f.files)})")
            labels = torch.as_tensor(f["labels"], dtype=torch.int64) if "labels" in f.files else None
            if "classes" in f.files:
                classes = [str(c) for c in f["classes"]]
            else:
                classes = [str(c) for c in range(int(labels.max()) + 1)] if labels is not None else []
            _check_npz_arrays(path, f["images"], labels, classes)
            splits[split] = ImageSet(_nhwc_to_tensor(f["images"]), labels, classes)
    return splits


def _check_npz_arrays(path: Path, images: np.ndarray, labels: Tensor | None, classes: list[str]) -> None:
    """Channels last, and every label a class index: caught here, not as a shape error in the encoder or an
    out-of-bounds target mid-run."""
    if images.ndim == 4 and images.shape[-1] not in (1, 3):
        layout = "channels first (N, C, H, W)" if images.shape[1] in (1, 3) else "not (N, H, W, C) with C 1 or 3"
        raise DatasetError(f"{path}: 'images' has shape {tuple(images.shape)}, {layout}; store uint8 NHWC "
                           f"(for NCHW arrays: images.transpose(0, 2, 3, 1))")
    if labels is not None and len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise DatasetError(f"{path}: label {bad} is out of range for its {len(classes)} classes (labels index "
                           f"'classes': 0..{len(classes) - 1}); fix 'labels' or list every class in 'classes'")


_TORCHVISION = {
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "mnist": ("MNIST", "train"),
    "fashion_mnist": ("FashionMNIST", "train"),
    "stl10": ("STL10", "split"),
}


def _load_torchvision(name: str, root: str, download: bool) -> dict[str, ImageSet]:
    import torchvision

    cls_name, split_arg = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    splits = {}
    for split in ("train", "test"):
        kwargs = {"split": split} if split_arg == "split" else {"train": split == "train"}
        try:
            ds = cls(root=root, download=download, **kwargs)
        except RuntimeError as err:
            raise DatasetError(f"{name}: {err} (root={root!r}); set data.download=true to fetch it, or point "
                               f"data.root at a folder that holds it") from err
        data = ds.data.numpy() if isinstance(ds.data, Tensor) else np.asarray(ds.data)
        if name == "stl10":  # STL10 stores (N, C, H, W)
            data = data.transpose(0, 2, 3, 1)
        labels = ds.labels if name == "stl10" else ds.targets
        classes = list(getattr(ds, "classes", [str(i) for i in range(int(np.max(labels)) + 1)]))
        splits[split] = ImageSet(_nhwc_to_tensor(data), torch.as_tensor(np.asarray(labels), dtype=torch.int64),
                                 classes)
    return splits


DATASETS = ("digits", "npz:<dir>", "folder:<dir>", "list:<file>", "shards:<dir|glob|pattern>", *sorted(_TORCHVISION))
STREAM = (True, False, "auto")


def _warn_unreadable(paths: list[Path]) -> None:
    if paths:
        shown = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        warnings.warn(f"skipped {len(paths)} unreadable image file(s), first: {shown}", stacklevel=3)


def decode_split(files: FileSet, unreadable: list[Path] | None = None, progress: bool = False) -> ImageSet:
    """``files`` decoded in memory; the unreadable ones are dropped (added to ``unreadable``; when not given,
    warned about here). ``progress``: a bar with images/s and the ETA (on a terminal, when it lasts)."""
    images, bad = decode_all(files.files, files.image_size, files.workers, progress=progress)
    found = [files.files[i] for i in bad]
    if unreadable is None:
        _warn_unreadable(found)
    else:
        unreadable += found
    if images is None:
        if unreadable is not None:
            _warn_unreadable(unreadable)
        raise DatasetError(f"no readable images among {len(files)} file(s) (first: {files.files[0]})")
    kept = torch.ones(len(files), dtype=torch.bool)
    kept[bad] = False
    return ImageSet(images, None if files.labels is None else files.labels[kept], files.classes)


def _load_files(name: str, size: int, workers: int, progress: bool) -> tuple[dict[str, FileSet], list[Path]]:
    splits = scan_source(name, progress)
    unreadable = [f for files in splits.values() for f in files.unreadable]
    if not len(splits["train"]):
        _warn_unreadable(unreadable)
        raise DatasetError(f"no readable images among {len(unreadable)} file(s) (first: {unreadable[0]})")
    for files in splits.values():
        files.image_size, files.workers = size, workers
    return splits, unreadable


def _hold_out_missing(splits: dict, val_fraction: float, test_fraction: float, seed: int,
                      origin: dict[str, str]) -> dict:
    """Carve val and test from train where the dataset has none (recording where each split came from)."""
    wanted = {name: f for name, f in (("val", val_fraction), ("test", test_fraction)) if name not in splits}
    for name, fraction in wanted.items():
        origin[name] = (f"{fraction:g} of train, stratified, seed {seed}" if fraction > 0 else
                        f"the dataset has none and data.{name}_fraction is 0")
    carve = {name: f for name, f in wanted.items() if f > 0}
    if not carve:
        return splits
    train, held = hold_out(splits["train"], carve, seed)
    return {**splits, "train": train, **held}


def load_dataset(name: str, root: str = "data", download: bool = False, val_fraction: float = 0.1,
                 image_size: int | None = None, limit: int | None = None, seed: int = 0, test_fraction: float = 0.0,
                 stream: bool | str = "auto", memory_limit_gb: float = 8.0, workers: int = 0,
                 progress: bool = True) -> DatasetSplits:
    """Load a dataset by name, carving stratified, seeded val (``val_fraction``) and test (``test_fraction``)
    splits from train where it has none. Image files (``folder:``, ``list:``, ``shards:``) are decoded in memory
    by ``workers`` processes, or kept as :class:`FileSet` splits to stream when ``stream`` is True, or "auto" and
    the decoded images would exceed ``memory_limit_gb``. ``progress``: bars while scanning and decoding (shown on
    a terminal, once they last a second)."""
    files = name.startswith(("folder:", "list:", "shards:"))
    if stream not in STREAM:
        raise DatasetError(f"data.stream={stream!r}: choose from auto, true, false")
    if stream is True and not files:
        raise DatasetError(f"data.stream=true streams image files (folder:, list:, shards:); {name!r} is loaded "
                           f"as arrays: use data.stream=auto")
    unreadable: list[Path] = []
    if name == "digits":
        splits = _load_digits()
    elif name.startswith("npz:"):
        splits = _load_npz(Path(name[4:]).expanduser())
    elif files:
        splits, unreadable = _load_files(name, image_size or 64, workers, progress)
    elif name in _TORCHVISION:
        splits = _load_torchvision(name, root, download)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
    origin = {split: "the dataset's" for split in splits}
    if name == "digits":
        origin["test"] = "20% of digits, stratified, seed 12345"
    train = splits["train"]
    if limit is not None and limit < len(train):
        keep, _ = stratified_split(train.labels, len(train), 1 - limit / len(train), seed=seed)
        splits["train"] = train.subset(keep)
    memory = "in memory"
    shards = {split: len(s.shards) for split, s in splits.items() if hasattr(s, "shards")}
    if files:  # decoded before the carving (so val and test hold only readable images), or streamed
        decoded_gb = sum(len(s) for s in splits.values()) * 3 * splits["train"].image_size ** 2 / 1e9
        if stream is True or (stream == "auto" and decoded_gb > memory_limit_gb):
            reason = "data.stream=true" if stream is True else f"> data.memory_limit_gb={memory_limit_gb:g}"
            where = "tar shards, read in sequence" if name.startswith("shards:") else "disk"
            memory = (f"streamed from {where} ({decoded_gb:.2f} GB decoded, {reason}; images that fail to "
                      f"decode are skipped and counted as they are met)")
        else:
            splits = {split: decode_split(s, unreadable, progress) for split, s in splits.items()}
            memory = f"in memory ({decoded_gb:.2f} GB)"
        _warn_unreadable(unreadable)
    splits = _hold_out_missing(splits, val_fraction, test_fraction, seed, origin)
    train, val, test = splits["train"], splits.get("val"), splits.get("test")
    if image_size is not None and not files:
        train, val, test = (_resize(s, image_size) for s in (train, val, test))
    return DatasetSplits(train=train, val=val, test=test, name=name, origin=origin, unreadable=unreadable,
                         memory=memory, shards=shards)


def _resize(images: ImageSet | None, size: int) -> ImageSet | None:
    if images is None or images.images.shape[-1] == size:
        return images
    from torchvision.transforms.v2.functional import resize

    return ImageSet(resize(images.images, [size, size], antialias=True), images.labels, images.classes)
