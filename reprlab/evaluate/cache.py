"""Features of streamed datasets in an on-disk cache: one ``.npy`` array per (encoder, split) and a JSON sidecar.

A streamed split (``data.stream``: image files, tar shards) is decoded in its DataLoader workers batch by batch
and each batch's features are written straight into ``features-<key>.npy`` (float32, or float16 with
``feature_cache_dtype: float16``), so extraction holds one batch, whatever the dataset's size. ``key`` hashes
the encoder's fingerprint (its weights file digest and spec, the precision) and the dataset's (source name, the
split's file list with sizes and modification times, image size, split, limit, seed, carved fractions): a changed
file list or encoder is a different key, so it is never served stale features. Both files are written to a
temporary name and renamed (:func:`reprlab.checkpoint.atomic_write`), the sidecar last: a run killed mid-way
leaves no cache that is trusted, and the next run recomputes it.

:class:`FeatureArray` reads such a file in row chunks (``chunk_rows`` at a time) as float32 tensors, mapping
the file only for the duration of a read, so the resident memory stays one chunk: the kNN bank
(:mod:`reprlab.evaluate.bank`) and the linear probe (:mod:`reprlab.evaluate.chunked_probe`) take it in place of a
tensor. ``np.load(path, mmap_mode="r")`` opens the same file outside reprlab.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from reprlab import distributed
from reprlab.checkpoint import atomic_write, write_json
from reprlab.data.files import DatasetError, FileSet
from reprlab.data.progress import bar as progress_bar
from reprlab.data.stream import FolderBatches
from reprlab.evaluate.features import cache_key, extract_features

CACHE_DTYPES = ("float32", "float16")
FORMAT = 1  # sidecar format: a sidecar of another format is not trusted
DEFAULT_CHUNK_ROWS = 65536


class FeatureArray:
    """(N, D) features in a ``.npy`` file, read as float32 tensors: ``rows(a, b)``, ``x[a:b]``, ``x[index]``
    (any integer tensor), ``chunks()`` of ``chunk_rows`` rows, or ``load()`` all of it."""

    def __init__(self, path: str | Path, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
        self.path = Path(path)
        array = np.load(self.path, mmap_mode="r")
        self.shape: tuple[int, int] = tuple(array.shape)
        self.dtype = str(array.dtype)
        del array
        if len(self.shape) != 2:
            raise ValueError(f"{self.path}: features must be 2-D (N, D), got shape {self.shape}")
        self.chunk_rows = max(1, int(chunk_rows))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def float32_bytes(self) -> int:
        """Bytes of the whole array as float32 (what ``load()`` holds)."""
        return self.shape[0] * self.shape[1] * 4

    def _map(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")  # dropped after each read: its pages leave the process

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` as a float32 (stop - start, D) tensor."""
        return torch.from_numpy(np.array(self._map()[start:stop], dtype=np.float32))

    def __getitem__(self, index: slice | int | Tensor | np.ndarray | list) -> Tensor:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self.rows(start, stop)[::step] if step != 1 else self.rows(start, stop)
        index = torch.as_tensor(index, dtype=torch.long)
        flat = index.flatten().numpy()
        rows = np.array(self._map()[flat], dtype=np.float32) if flat.size else np.empty((0, self.shape[1]),
                                                                                         np.float32)
        return torch.from_numpy(rows).reshape(*index.shape, self.shape[1])

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, rows start:stop)`` of ``rows`` (default ``chunk_rows``) rows at a time, in order."""
        step = max(1, int(rows or self.chunk_rows))
        for start in range(0, len(self), step):
            stop = min(start + step, len(self))
            yield start, stop, self.rows(start, stop)

    def load(self) -> Tensor:
        """The whole array as one float32 tensor."""
        return self.rows(0, len(self))


def auto_chunk_rows(memory_limit_gb: float, dim: int) -> int:
    """Rows of (N, ``dim``) float32 features read at once when they stay on disk: a bank chunk, a query chunk and
    the search's (1024 x chunk) similarity block each take about 1/32 of ``memory_limit_gb``."""
    return max(1024, int(memory_limit_gb * 1e9 / (32 * 4 * max(dim, 1024))))


def row_chunks(x: Tensor | FeatureArray, rows: int) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, float32 rows)`` of a tensor or a :class:`FeatureArray`, ``rows`` at a time."""
    if isinstance(x, FeatureArray):
        yield from x.chunks(rows)
        return
    for start in range(0, len(x), max(1, rows)):
        stop = min(start + rows, len(x))
        yield start, stop, x[start:stop].float()


# ------------------------------------------------------------------------------------------- fingerprints


def files_digest(files: list[Any]) -> str:
    """sha256 of each file's path, size and modification time (tar members: the shard's, and the member's byte
    range), in order: any file added, removed, replaced or touched changes it."""
    digest, shards = hashlib.sha256(), {}
    for f in files:
        shard = getattr(f, "shard", None)
        if shard is not None:  # a tar member (reprlab.data.shards.TarMember)
            if shard not in shards:
                st = os.stat(shard)
                shards[shard] = f"{st.st_size}:{st.st_mtime_ns}"
            digest.update(f"{shard}\0{f.name}\0{f.offset}\0{f.size}\0{shards[shard]}\n".encode())
            continue
        try:
            st = os.stat(f)
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{f}\0{stamp}\n".encode())
    return digest.hexdigest()[:32]


def dataset_fingerprint(split: FileSet, split_name: str, source: str, **settings: Any) -> dict[str, Any]:
    """What determines the pixels of a streamed split: the source, the split's files (digest and count), the image
    size, plus ``settings`` (limit, seed, carved fractions)."""
    return {"source": source, "split": split_name, "files": files_digest(split.files), "num_files": len(split),
            "image_size": split.image_size, **settings}


# ------------------------------------------------------------------------------------------- the cache


@dataclass
class FeatureCache:
    """``directory`` holding ``features-<key>.npy`` + ``features-<key>.json``; ``reuse=False`` recomputes
    (``cache_features: false``); ``chunk_rows``: the rows a :class:`FeatureArray` it returns reads at once."""

    directory: Path
    dtype: str = "float32"
    reuse: bool = True
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    progress: bool = False

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"features-{key}.npy", self.directory / f"features-{key}.json"

    def lookup(self, key: str) -> FeatureArray | None:
        """The complete cache under ``key``, or None (absent, half written, or another format)."""
        array_path, meta_path = self.paths(key)
        if not (self.reuse and array_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            array = FeatureArray(array_path, self.chunk_rows)
        except (OSError, ValueError):
            return None
        if (meta.get("format") != FORMAT or meta.get("key") != key or list(array.shape) != meta.get("shape")
                or array.dtype != meta.get("dtype")):
            return None
        return array

    def features(self, encoder: nn.Module, split: FileSet, fingerprint: dict[str, Any], batch_size: int,
                 device: torch.device, desc: str = "features") -> tuple[FeatureArray | None, bool]:
        """The features of streamed ``split`` under ``fingerprint`` (encoder and dataset): ``(array, reused)``.
        Every rank calls this under DDP (each extracts its share); rank 0 writes the cache and alone gets the
        array (None on the other ranks)."""
        key = cache_key(**fingerprint, dtype=self.dtype)
        found = self.lookup(key) if distributed.is_main() else None
        if distributed.all_gather_object(found is not None)[0]:  # rank 0 decides: no rank waits alone
            return found, True
        array_path, meta_path = self.paths(key)
        shape = extract_to_file(encoder, split, array_path, batch_size, device, self.dtype,
                                self.progress and distributed.is_main(), desc)
        if not distributed.is_main():
            return None, False
        write_json(meta_path, {"format": FORMAT, "key": key, "shape": list(shape), "dtype": self.dtype,
                               "fingerprint": fingerprint})  # the sidecar last: it marks the cache complete
        return FeatureArray(array_path, self.chunk_rows), False

    def sweep(self) -> None:
        """Remove what a killed run left half written here (temporary arrays, DDP parts): call it only where no
        other run writes (the run directory's own cache, under its lock)."""
        if self.directory.is_dir():
            for leftover in (*self.directory.glob(".features-*.tmp"), *self.directory.glob(".features-*.part*")):
                leftover.unlink(missing_ok=True)

    def discard(self, key_or_array: FeatureArray) -> None:
        """Remove one cache entry (``cache_features: false``: the array served this evaluation only)."""
        if distributed.is_main():
            meta = key_or_array.path.with_suffix(".json")
            meta.unlink(missing_ok=True)
            key_or_array.path.unlink(missing_ok=True)


def _stream(split: FileSet, batch_size: int, rank: int, world: int) -> FolderBatches:
    return FolderBatches(files=split.files, image_size=split.image_size, batch_size=min(batch_size, len(split)),
                         shuffle=False, drop_last=False, rank=rank, world_size=world, num_workers=split.workers)


def _write_rows(path: str | Path, index: np.ndarray, values: Tensor) -> None:
    """Write rows ``index`` of the ``.npy`` at ``path``, mapping it only for this write (so the written pages
    leave this process: its memory stays one batch)."""
    array = np.lib.format.open_memmap(path, mode="r+")
    array[index] = values.numpy().astype(array.dtype, copy=False)
    array.flush()
    del array


def _check_readable(stream: FolderBatches, split: FileSet) -> None:
    skipped = sorted(i for part in distributed.all_gather_object(sorted(stream.skipped)) for i in part)
    if skipped:
        raise DatasetError(f"{len(skipped)} image file(s) could not be decoded (first: {split.files[skipped[0]]}); "
                           f"evaluation needs every image: remove them, or set data.stream=false (decoded in "
                           f"memory, unreadable files are dropped)")


class _Rows:
    """Write features into a ``.npy`` created at the first batch (when the width is known)."""

    def __init__(self, path: str, rows: int, dtype: str) -> None:
        self.path, self.rows, self.dtype, self.width = path, rows, dtype, 0

    def write(self, positions: Tensor, features: Tensor) -> None:
        if not self.width:
            self.width = features.shape[1]
            created = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=(self.rows, self.width))
            del created  # created at its full size, sparse until written
        _write_rows(self.path, positions.numpy(), features)


def _fill(writer: _Rows, encoder: nn.Module, stream: FolderBatches, split: FileSet, batch_size: int,
          device: torch.device, progress: bool, desc: str, part_index: Tensor | None = None) -> None:
    """Every batch of ``stream`` through ``encoder`` into ``writer``: at the files' positions, or (a DDP part,
    ``part_index`` given) at consecutive rows, recording each row's file position in ``part_index``."""
    written = 0
    with progress_bar(len(stream.order(0)), desc, progress) as bar:
        for batch in stream.epoch(0):
            features = extract_features(encoder, batch["images"], batch_size, device)
            if part_index is None:
                writer.write(batch["index"], features)
            else:
                writer.write(torch.arange(written, written + len(features)), features)
                part_index[written:written + len(features)] = batch["index"]
            written += len(features)
            bar.update(len(batch["index"]))
    _check_readable(stream, split)


def extract_to_file(encoder: nn.Module, split: FileSet, path: Path, batch_size: int, device: torch.device,
                    dtype: str = "float32", progress: bool = False, desc: str = "features") -> tuple[int, int]:
    """Stream ``split`` through ``encoder`` into the ``.npy`` file ``path`` (written atomically), in file order;
    returns its shape. Under DDP each rank streams its share into a part file next to ``path`` and rank 0
    gathers the parts (the cache directory must be shared by the ranks, as the run directory is)."""
    world, rank = distributed.world_size(), distributed.rank()
    stream = _stream(split, batch_size, rank, world)
    if world == 1:
        writers: list[_Rows] = []

        def fill(target: str) -> None:
            writers.append(_Rows(target, len(split), dtype))
            _fill(writers[0], encoder, stream, split, batch_size, device, progress, desc)

        atomic_write(path, fill)
        return len(split), writers[0].width
    part = path.with_name(f".{path.name}.rank{rank}.part")
    path.parent.mkdir(parents=True, exist_ok=True)
    part_index = torch.full((len(stream.order(0)),), -1, dtype=torch.long)
    writer = _Rows(str(part), len(part_index), dtype)
    _fill(writer, encoder, stream, split, batch_size, device, progress, desc, part_index)
    np.save(part.with_suffix(".index.npy"), part_index.numpy())
    width = max(distributed.all_gather_object(writer.width))
    distributed.barrier()  # every part written
    if distributed.is_main():
        atomic_write(path, lambda target: _merge_parts(path, target, world, (len(split), width), dtype))
    distributed.barrier()
    part.unlink(missing_ok=True)
    part.with_suffix(".index.npy").unlink(missing_ok=True)
    return len(split), width


def _merge_parts(path: Path, target: str, world: int, shape: tuple[int, int], dtype: str) -> None:
    """Rank 0: the ranks' part files into one array in file order (padding repeats land twice, identically)."""
    out = np.lib.format.open_memmap(target, mode="w+", dtype=dtype, shape=shape)
    del out
    for r in range(world):
        part = path.with_name(f".{path.name}.rank{r}.part")
        index = np.load(part.with_suffix(".index.npy"))
        rows = FeatureArray(part)
        for start, stop, values in rows.chunks():
            keep = index[start:stop] >= 0
            _write_rows(target, index[start:stop][keep], values[torch.from_numpy(keep)])
