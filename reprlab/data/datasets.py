"""Datasets as uint8 tensors held in memory: decoded once, augmented later on the training device.

Names: ``digits`` (scikit-learn's bundled 8x8 digits, the offline default), ``npz:<dir>`` (train.npz and optional
val.npz / test.npz with uint8 NHWC ``images``, int ``labels``, ``classes``), ``folder:<dir>`` (class sub-folders are
labels; a flat folder is unlabeled), and the torchvision datasets ``cifar10``, ``cifar100``, ``stl10``, ``mnist``,
``fashion_mnist`` (downloaded only when ``download=True``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset name, path or file that cannot be used."""


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


@dataclass
class DatasetSplits:
    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    name: str

    @property
    def labeled(self) -> bool:
        return self.train.labels is not None


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
            splits[split] = ImageSet(_nhwc_to_tensor(f["images"]), labels, classes)
    return splits


def decode_file(path: str | Path, size: int, channels: int = 3) -> Tensor:
    """One image file -> uint8 (channels, size, size): shorter side resized to ``size`` (antialiased), then
    the central square: how both folder loaders prepare images. Raises on unreadable files."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import center_crop, resize

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    image = decode_image(str(path), mode=mode)  # (C, H, W) uint8
    image = resize(image, size, antialias=True)
    return center_crop(image, [size, size])


def _decode_folder_images(paths: list[Path], size: int) -> tuple[Tensor, list[int]]:
    """Decode and resize image files to (N, 3, size, size) uint8; unreadable files are skipped with a warning."""
    images, kept, bad = [], [], []
    for i, path in enumerate(paths):
        try:
            images.append(decode_file(path, size))
        except Exception:  # noqa: BLE001 - any decoder failure means "not an image we can read"
            bad.append(path)
            continue
        kept.append(i)
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s), first: {bad[0]}", stacklevel=3)
    if not images:
        raise DatasetError(f"no readable images among {len(paths)} file(s) (first: {paths[0] if paths else None})")
    return torch.stack(images), kept


def scan_folder(root: str | Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Image files under ``root`` in sorted order: ``(files, labels, classes)``. Class sub-folders (searched
    recursively) give labels; a flat folder gives ``labels=None`` and no classes. The one folder scan of both
    the in-memory and the streamed loader."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {str(root)!r} does not exist")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    labels: list[int] | None = None
    if subdirs:  # class sub-folders = labels
        files, labels = [], []
        for label, sub in enumerate(subdirs):
            found = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [label] * len(found)
    else:
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"image folder {str(root)!r} holds no image files (looked for {sorted(IMAGE_SUFFIXES)})")
    return files, labels, [d.name for d in subdirs]


def _load_folder(directory: Path, size: int) -> dict[str, ImageSet]:
    files, labels, classes = scan_folder(directory)
    images, kept = _decode_folder_images(files, size)
    label_tensor = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)[kept]
    return {"train": ImageSet(images, label_tensor, classes)}


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


DATASETS = ("digits", "npz:<dir>", "folder:<dir>", *sorted(_TORCHVISION))


def load_dataset(name: str, root: str = "data", download: bool = False, val_fraction: float = 0.1,
                 image_size: int | None = None, limit: int | None = None, seed: int = 0) -> DatasetSplits:
    """Load a dataset by name into uint8 tensors, carving a stratified validation split from train if needed."""
    if name == "digits":
        splits = _load_digits()
    elif name.startswith("npz:"):
        splits = _load_npz(Path(name[4:]).expanduser())
    elif name.startswith("folder:"):
        splits = _load_folder(Path(name[7:]).expanduser(), image_size or 64)
    elif name in _TORCHVISION:
        splits = _load_torchvision(name, root, download)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
    train = splits["train"]
    if limit is not None and limit < len(train):
        keep, _ = stratified_split(train.labels, len(train), 1 - limit / len(train), seed=seed)
        train = train.subset(keep)
    val = splits.get("val")
    if val is None and val_fraction > 0:
        keep, held = stratified_split(train.labels, len(train), val_fraction, seed=seed)
        train, val = train.subset(keep), train.subset(held)
    if image_size is not None and not name.startswith("folder:"):
        train, val, test = (_resize(s, image_size) for s in (train, val, splits.get("test")))
    else:
        test = splits.get("test")
    return DatasetSplits(train=train, val=val, test=test, name=name)


def _resize(images: ImageSet | None, size: int) -> ImageSet | None:
    if images is None or images.images.shape[-1] == size:
        return images
    from torchvision.transforms.v2.functional import resize

    return ImageSet(resize(images.images, [size, size], antialias=True), images.labels, images.classes)
