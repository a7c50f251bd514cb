"""Image files as a dataset: the one scan of folders and file lists (the decoder is reprlab.data.decode), shared
by the in-memory loader (reprlab.data.datasets) and the streamed one (reprlab.data.stream); tar shards are
scanned by reprlab.data.shards into the same :class:`FileSet`.

``folder:<dir>`` layouts:

- labeled: class sub-folders (folders nested inside a class belong to it), classes in sorted name order;
- unlabeled: a flat folder of images;
- split folders: ``train/`` with optional ``val/`` (or ``valid/``, ``validation/``) and ``test/``, each labeled
  (the same class folders in each) or flat; a ``train/`` of loose images next to other folders is a class.

``list:<file>``: a ``.csv`` or ``.txt`` file list, one ``path[,label]`` per line (an optional ``path,label``
header; ``#`` comments and blank lines skipped), paths relative to the list's folder, labels class names or
integers. Hidden entries (names starting with ".": .ipynb_checkpoints/, .DS_Store, ...) are always ignored in a
folder. Loose images next to sub-folders are an error: either would silently be dropped. Missing and zero-byte
files are set aside at scan time (counted as unreadable), so both loaders see the same file list.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reprlab.data.decode import decode_file, preload, read_image  # noqa: F401 - read_image: re-exported
from reprlab.data.progress import bar as progress_bar

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
LIST_SUFFIXES = (".csv", ".txt")
_HEADERS = {"path", "file", "filename", "filepath", "image", "image_path"}


class DatasetError(ValueError):
    """A dataset name, path or file that cannot be used."""


@dataclass
class FileSet:
    """Image files not decoded yet: ``files``, ``labels`` (N,) int64 or None, ``classes``; ``image_size`` and
    ``workers`` say how they are decoded. The interface of an ImageSet (``len``, ``labels``, ``classes``,
    ``subset``) without its ``images``: a streamed split."""

    files: list[Path]
    labels: Tensor | None
    classes: list[str]
    image_size: int = 64
    workers: int = 0
    unreadable: list[Path] = field(default_factory=list)  # set aside by the scan (missing, zero bytes)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: Tensor) -> FileSet:
        labels = None if self.labels is None else self.labels[index]
        return FileSet([self.files[i] for i in index.tolist()], labels, self.classes, self.image_size,
                       self.workers)

    @property
    def images(self) -> FileImages:
        """The images, decoded when indexed: what a report draws, never the whole split at once."""
        return FileImages(self)


class FileImages:
    """``images[index]`` -> uint8 (*index.shape, C, S, S) decoded from the files of a :class:`FileSet` (an int,
    a slice or an index tensor of any shape); an unreadable file among them is an error naming it."""

    def __init__(self, files: FileSet) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int | slice | Tensor) -> Tensor:
        index = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index)
        paths = [self.files.files[i] for i in index.flatten().tolist()]
        if not paths:
            return torch.empty(*index.shape, 3, self.files.image_size, self.files.image_size, dtype=torch.uint8)
        images, bad = decode_all(paths, self.files.image_size, self.files.workers)
        if bad:
            raise DatasetError(f"{len(bad)} image file(s) could not be decoded (first: {paths[bad[0]]}); remove "
                               f"them, or set data.stream=false (decoded in memory, unreadable files are dropped)")
        return images.reshape(*index.shape, *images.shape[1:])


def default_workers() -> int:
    """Decoding processes when ``data.workers`` is null: one per CPU core but one, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) - 1))


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _images_under(folder: Path, bar: Any = None) -> list[Path]:
    """Every image file below ``folder``, hidden files and folders pruned, in sorted path order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        images = [Path(dirpath, f) for f in filenames
                  if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        found += images
        if bar is not None:
            bar.update(len(images))
    return sorted(found)


def _few(paths: list, n: int = 3) -> str:
    return ", ".join(str(p) for p in paths[:n]) + (", ..." if len(paths) > n else "")


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, loose image files) of ``folder``, hidden entries ignored; both at once is an error."""
    with os.scandir(folder) as it:
        entries = _visible(list(it))
    subdirs = [Path(e.path) for e in entries if e.is_dir()]
    images = [Path(e.path) for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
    if subdirs and images:
        raise DatasetError(
            f"image folder {str(folder)!r} mixes {len(images)} loose image(s) ({_few([p.name for p in images])}) "
            f"with {len(subdirs)} sub-folder(s) ({_few([p.name + '/' for p in subdirs])}); for class labels move "
            f"every image into a class sub-folder, for an unlabeled folder move the sub-folders out (or rename "
            f"them to start with '.')")
    return subdirs, images


def _usable(path: Path) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def _file_set(files: list[Path], labels: list[int] | None, classes: list[str]) -> FileSet:
    """A FileSet of ``files``; missing and zero-byte files are set aside as unreadable before any decoding."""
    usable = [_usable(f) for f in files]
    kept = [f for f, ok in zip(files, usable) if ok]
    if labels is not None:
        labels = [label for label, ok in zip(labels, usable) if ok]
    return FileSet(kept, None if labels is None else torch.as_tensor(labels, dtype=torch.int64), classes,
                   unreadable=[f for f, ok in zip(files, usable) if not ok])


def _scan_one(folder: Path, progress: bool = False) -> FileSet:
    """One split's folder: class sub-folders (labeled) or a flat folder (unlabeled)."""
    with progress_bar(None, f"scanning {folder}", progress) as bar:
        subdirs, images = _entries(folder)
        bar.update(len(images))
        return _scan_classes(folder, subdirs, images, bar)


def _scan_classes(folder: Path, subdirs: list[Path], images: list[Path], bar: Any) -> FileSet:
    """The FileSet of ``folder``'s loose ``images`` (unlabeled) or of its class sub-folders ``subdirs``."""
    if not subdirs:
        files, labels, classes = images, None, []
    else:
        files, label_list, classes, empty = [], [], [], []
        for sub in subdirs:
            found = _images_under(sub, bar)
            if not found:
                empty.append(sub.name + "/")
                continue
            label_list += [len(classes)] * len(found)
            classes.append(sub.name)
            files += found
        if empty and files:
            raise DatasetError(f"image folder {str(folder)!r}: class folder(s) {_few(empty)} hold no images (class "
                               f"labels come from the sub-folders); add images or remove those folders")
        labels = label_list
    if not files:
        raise DatasetError(f"image folder {str(folder)!r} holds no image files (looked for {sorted(IMAGE_SUFFIXES)})")
    return _file_set(files, labels, classes)


def split_folders(root: Path) -> dict[str, Path]:
    """``{"train": root/train, "val": ..., "test": ...}`` when ``root`` holds split folders, else ``{}``."""
    subdirs, _ = _entries(root)
    splits = {d: SPLIT_FOLDERS.get(d.name.lower()) for d in subdirs}
    if "train" not in splits.values():
        return {}
    others = [d.name + "/" for d, split in splits.items() if split is None]
    train = next(d for d, split in splits.items() if split == "train")
    if others and not _entries(train)[0]:  # train/ holds images: a class (bus/ car/ train/), not a split
        return {}
    if others:
        raise DatasetError(f"image folder {str(root)!r} holds the split folder train/ next to {_few(others)}; put "
                           f"every image under train/, val/ and test/ (class sub-folders inside each), or remove "
                           f"the other folders")
    found: dict[str, Path] = {}
    for folder, split in splits.items():
        if split in found:
            raise DatasetError(f"image folder {str(root)!r} holds two {split} folders ({found[split].name}/, "
                               f"{folder.name}/); keep one")
        found[split] = folder
    return found


def scan_folder(root: str | Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Image files of one folder in sorted order: ``(files, labels, classes)``; class sub-folders give labels,
    a flat folder ``labels=None``. Split folders are an error here (scan ``root/train``, or ``scan_source``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {str(root)!r} does not exist")
    if split_folders(root):
        raise DatasetError(f"image folder {str(root)!r} holds split folders (train/, ...): give one of them")
    one = _scan_one(root)
    return one.files, None if one.labels is None else one.labels.tolist(), one.classes


def _scan_splits(root: Path, progress: bool = False) -> dict[str, FileSet]:
    folders = split_folders(root)
    if not folders:
        return {"train": _scan_one(root, progress)}
    splits = {split: _scan_one(folder, progress) for split, folder in folders.items()}
    train = splits["train"]
    for split, files in splits.items():
        if (files.labels is None) != (train.labels is None):
            raise DatasetError(f"image folder {str(root)!r}: {folders[split].name}/ is "
                               f"{'un' if files.labels is None else ''}labeled but train/ is not; give every "
                               f"split class sub-folders, or none")
        if files.classes != train.classes:
            extra = sorted(set(files.classes) - set(train.classes))
            lacking = sorted(set(train.classes) - set(files.classes))
            raise DatasetError(f"image folder {str(root)!r}: the classes of {folders[split].name}/ differ from "
                               f"train/'s (only in {split}: {extra or 'none'}; missing from {split}: "
                               f"{lacking or 'none'}); give every split the same class sub-folders")
    return splits


def _list_rows(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        rows = [[cell.strip() for cell in row] for row in csv.reader(text.splitlines())]
    else:  # path[,label] or "path label" (the ImageNet train.txt convention)
        rows = []
        for line in text.splitlines():
            line = line.strip()
            parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
            rows.append([p.strip() for p in parts] if line else [])
    rows = [r for r in rows if r and r[0] and not r[0].startswith("#")]
    if rows and rows[0][0].lower() in _HEADERS:
        rows = rows[1:]
    return rows


def _read_list(path: Path) -> FileSet:
    """A file list: ``path[,label]`` rows, paths relative to the list's folder."""
    if not path.is_file():
        raise DatasetError(f"file list {str(path)!r} does not exist")
    if path.suffix.lower() not in LIST_SUFFIXES:
        raise DatasetError(f"file list {str(path)!r} must be a {' or '.join(LIST_SUFFIXES)} file")
    rows = _list_rows(path)
    if not rows:
        raise DatasetError(f"file list {str(path)!r} lists no files (one path[,label] per line)")
    labeled = [len(r) > 1 and r[1] != "" for r in rows]
    if any(labeled) and not all(labeled):
        line = rows[labeled.index(False)][0]
        raise DatasetError(f"file list {str(path)!r}: {line!r} has no label but other rows do; label every row "
                           f"(path,label) or none")
    files = [(path.parent / r[0]).expanduser() for r in rows]
    labels, classes = None, []
    if all(labeled):
        names = [r[1] for r in rows]
        numeric = all(n.lstrip("-").isdigit() for n in names)
        classes = sorted(set(names), key=int if numeric else str)
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[n] for n in names]
    return _file_set(files, labels, classes)


def scan_source(name: str, progress: bool = False) -> dict[str, FileSet]:
    """The splits a ``folder:<dir>``, ``list:<file>`` or ``shards:<dir|glob|pattern>`` dataset provides
    (``train``, maybe ``val``, ``test``); ``progress``: a bar while scanning (on a terminal, when it lasts)."""
    if name.startswith("list:"):
        return {"train": _read_list(Path(name[5:]).expanduser())}
    if name.startswith("shards:"):
        from reprlab.data.shards import scan_shards

        return scan_shards(name[len("shards:"):], progress)
    root = Path(name[len("folder:"):]).expanduser()
    if not root.is_dir():
        raise DatasetError(f"image folder {str(root)!r} does not exist")
    return _scan_splits(root, progress)


# ------------------------------------------------------------------------------------------- decoding


class DecodedFiles(torch.utils.data.Dataset):
    """Item i -> (uint8 image or None when unreadable, i); runs inside the DataLoader workers."""

    def __init__(self, files: list[Path], size: int, channels: int = 3) -> None:
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int]:
        try:
            return decode_file(self.files[i], self.size, self.channels), i
        except Exception:  # noqa: BLE001 - any decoder failure means "not an image we can read"
            return None, i


def collate(items: list[tuple[Tensor | None, int]]) -> tuple[Tensor | None, Tensor, Tensor]:
    """-> (images (B', C, S, S) of the readable files or None, their indices (B',), unreadable indices)."""
    good = [(image, i) for image, i in items if image is not None]
    bad = torch.tensor([i for image, i in items if image is None], dtype=torch.long)
    if not good:
        return None, torch.empty(0, dtype=torch.long), bad
    return torch.stack([image for image, _ in good]), torch.tensor([i for _, i in good]), bad


def decode_all(files: list[Path], size: int, workers: int = 0, chunk: int = 64,
               progress: bool = False) -> tuple[Tensor | None, list[int]]:
    """Decode ``files`` in order to (N', 3, size, size) uint8 with ``workers`` processes (0: here); returns the
    images of the readable files (None when there are none) and the positions of the unreadable ones.
    ``progress``: a bar with images/s and the ETA (on a terminal, when it lasts)."""
    plan = [list(range(i, min(i + chunk, len(files)))) for i in range(0, len(files), chunk)]
    workers = workers if len(files) > 4 * chunk else 0  # a few images: starting processes costs more
    if workers:
        preload()  # imported once here, not by every worker
    loader = torch.utils.data.DataLoader(DecodedFiles(files, size), batch_sampler=plan, num_workers=workers,
                                         collate_fn=collate, generator=torch.Generator())  # global RNG untouched
    images, bad = [], []
    with progress_bar(len(files), f"decoding {len(files)} images", progress) as bar:
        for batch, index, unreadable in loader:
            bad += unreadable.tolist()
            bar.update(len(index) + len(unreadable))
            if batch is not None:
                images.append(batch)
    return (torch.cat(images) if images else None), bad
