"""WebDataset-style tar shards as a dataset: ``data.name: shards:<dir | glob | brace pattern>``.

A shard is an uncompressed ``.tar``; a sample is the members that share a key (the member's path up to the first
dot of its file name, WebDataset's convention): one image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``) and
optionally a label, ``.cls`` (a class index or name as text) or ``.json`` (``{"label": ...}``); other members
(captions, metadata) are ignored. Labels are class names or integers, as in a ``list:`` file: integers sort as
numbers, and a label is the index of its name among the classes present.

The name takes a folder (every ``*.tar`` in it), a glob (``data/*.tar``) or a brace pattern
(``data/train-{000..009}.tar``, ``{a,b}``). Shards whose names start with ``train``, ``val`` (``valid``,
``validation``) or ``test`` are those splits when any is named val or test, as split folders are; otherwise every
shard is train.

Why the standard ``tarfile`` module and not the ``webdataset`` package: one pass over the tar headers (tarfile
reads each 512-byte header and seeks past the data) gives every sample's byte range, so a shard split is a
:class:`~reprlab.data.files.FileSet` whose "files" are :class:`TarMember` ranges, and everything the stages do
with image files (decoding a small set into memory, carving val / test, the monitor's bank, evaluation in order)
works unchanged. Training reads each worker's part of the shards front to back (:mod:`reprlab.data.shard_stream`),
which is all the sequential reading shards are for. No extra package; WebDataset's extras (URLs and pipes, its
pipeline DSL, resampling) are not needed for local shards.
"""

from __future__ import annotations

import glob
import json
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from reprlab.data.files import DatasetError, FileSet
from reprlab.data.progress import bar as progress_bar

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSIONS = ("cls", "json")
_SPLIT_NAME = re.compile(r"^(train|val|valid|validation|test)(?=[-_.0-9]|$)", re.IGNORECASE)
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_PATTERN_HELP = "a folder of .tar files, a glob such as data/*.tar, or a pattern such as data/train-{000..009}.tar"


class TarMember(NamedTuple):
    """One image inside a shard: its byte range. Read whole with :meth:`read_bytes` (what the decoder takes in
    place of a file path); printed as ``shard.tar:member``."""

    shard: str
    offset: int
    size: int
    name: str

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


@dataclass
class ShardSet(FileSet):
    """A split of tar shards: a :class:`FileSet` whose ``files`` are :class:`TarMember` (in shard order, then
    the order inside each shard) and ``shards`` the shard files holding them."""

    shards: list[str] = field(default_factory=list)

    def subset(self, index: torch.Tensor) -> ShardSet:
        files = [self.files[i] for i in index.tolist()]
        used = {member.shard for member in files}
        return ShardSet(files, None if self.labels is None else self.labels[index], self.classes,
                        self.image_size, self.workers, shards=[s for s in self.shards if s in used])


# ------------------------------------------------------------------------------------------- names


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero-padded as written); ``{x,y}`` -> x, y;
    several braces expand left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") or len(first) == len(last) else 0
        if int(last) < int(first):
            raise DatasetError(f"shards:{pattern}: the range {{{body}}} counts down; write {{{last}..{first}}}")
        items = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def shard_paths(spec: str) -> list[Path]:
    """The shard files named by ``spec`` (a folder, globs, brace patterns), in order, each once; none is an
    error, and so is a file a brace pattern names that does not exist."""
    spec = spec.strip()
    root = Path(spec).expanduser()
    if root.is_dir():
        found = sorted(p for p in root.glob("*.tar") if not p.name.startswith("."))
        if not found:
            raise DatasetError(f"shards:{spec}: the folder holds no .tar files; give {_PATTERN_HELP}")
        return found
    found, missing = [], []
    for one in expand_braces(spec):
        one = str(Path(one).expanduser())
        if glob.has_magic(one):
            found += sorted(Path(p) for p in glob.glob(one) if not Path(p).name.startswith("."))
        elif Path(one).is_file():
            found.append(Path(one))
        else:
            missing.append(one)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"shards:{spec}: shard {missing[0]!r} does not exist{more}; give {_PATTERN_HELP}")
    if not found:
        raise DatasetError(f"shards:{spec} matched no shard files; give {_PATTERN_HELP}")
    return list(dict.fromkeys(found))


def _by_split(paths: list[Path], spec: str) -> dict[str, list[Path]]:
    """``{"train": [...], "val": [...], "test": [...]}`` from the shards' names, or every shard as train."""
    named = {p: _SPLIT_NAME.match(p.name) for p in paths}
    splits = {p: _SPLITS[m.group(1).lower()] if m else None for p, m in named.items()}
    if not {"val", "test"} & set(splits.values()):
        return {"train": paths}
    odd = [p.name for p, split in splits.items() if split is None]
    if odd or "train" not in splits.values():
        what = f"{', '.join(odd[:3])} name no split" if odd else "none is named train"
        raise DatasetError(f"shards:{spec}: some shards are named val / test but {what}; name every shard "
                           f"train-*, val-* or test-*, or give the splits' shards apart")
    return {split: [p for p, s in splits.items() if s == split] for split in ("train", "val", "test")
            if split in splits.values()}


# ------------------------------------------------------------------------------------------- scanning


def _label_text(data: bytes, ext: str, where: str) -> str | None:
    """The label a ``.cls`` or ``.json`` member holds, as text (None: a .json without "label")."""
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "cls":
        if not text:
            raise DatasetError(f"shard member {where} is empty; a .cls member holds the class index or name")
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"shard member {where} is not valid JSON ({err}); fix it or remove it") from None
    value = value.get("label") if isinstance(value, dict) else value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DatasetError(f"shard member {where}: label {value!r} is neither a class index nor a name")
    return str(value)


def _check_end(tar: tarfile.TarFile, path: Path) -> None:
    """tarfile stops silently at a damaged or missing header after the first: what follows the last member must
    be the archive's end (zero blocks; every tar writer puts them there), or members were lost."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if not block:
        raise DatasetError(f"shard {str(path)!r} is corrupt: truncated after its last whole member (no end of "
                           f"archive); rewrite the shard")
    if block.strip(b"\0"):
        what = "truncated inside a tar header" if len(block) < tarfile.BLOCKSIZE else "a damaged tar header"
        raise DatasetError(f"shard {str(path)!r} is corrupt: {what} at byte {tar.offset} (the members after it "
                           f"cannot be read); rewrite the shard")


def read_shard(path: Path) -> tuple[list[TarMember], list[str | None], list[TarMember]]:
    """(image members, their label texts or None, zero-byte images) of one shard, in the shard's order."""
    images: dict[str, TarMember] = {}
    labels: dict[str, dict[str, str | None]] = {}
    try:
        size = path.stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                base = posixpath.basename(info.name)
                if not info.isfile() or base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key, ext = posixpath.join(posixpath.dirname(info.name), stem), ext.lower()
                if info.offset_data + info.size > size:
                    raise DatasetError(f"shard {str(path)!r} is corrupt: truncated inside {info.name} (it ends "
                                       f"at byte {info.offset_data + info.size} of {size}); rewrite the shard")
                if ext in IMAGE_EXTENSIONS:
                    if key in images:
                        raise DatasetError(f"shard {str(path)!r}: sample {key!r} holds two images "
                                           f"({images[key].name}, {info.name}); keep one image per key")
                    images[key] = TarMember(str(path), info.offset_data, info.size, info.name)
                elif ext in LABEL_EXTENSIONS:
                    data = tar.extractfile(info).read()
                    labels.setdefault(key, {})[ext] = _label_text(data, ext, f"{path}:{info.name}")
            _check_end(tar, path)
    except tarfile.ReadError as err:
        if "unexpected end of data" in str(err):  # the next header lies past the end of the file
            raise DatasetError(f"shard {str(path)!r} is corrupt: truncated after its last whole member (no end "
                               f"of archive); rewrite the shard") from None
        raise DatasetError(f"shard {str(path)!r} is not a readable uncompressed tar ({err}); rewrite it (a "
                           f"compressed .tar.gz: decompress it, its images are compressed already)") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DatasetError(f"shard {str(path)!r} is not a readable uncompressed tar ({err}); rewrite it (a "
                           f"compressed .tar.gz: decompress it, its images are compressed already)") from None
    if not images:
        raise DatasetError(f"shard {str(path)!r} holds no images (looked for "
                           f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)} members); remove it from the shards")
    texts = [next((t for t in (labels.get(k, {}).get("cls"), labels.get(k, {}).get("json")) if t is not None),
                  None) for k in images]
    kept = [(m, t) for m, t in zip(images.values(), texts) if m.size > 0]
    return [m for m, _ in kept], [t for _, t in kept], [m for m in images.values() if m.size == 0]


def _classes(texts: list[str]) -> list[str]:
    numeric = all(t.lstrip("-").isdigit() for t in texts)
    return sorted(set(texts), key=int if numeric else str)


def scan_shards(spec: str, progress: bool = False) -> dict[str, ShardSet]:
    """The splits of ``shards:<spec>``: ``train`` (maybe ``val``, ``test``) as :class:`ShardSet`; a bar over the
    shards with ``progress`` (on a terminal, when it lasts). Errors name the shard (no shards matched, a shard
    that is no tar or is damaged, one without images, a sample without its label where others have one)."""
    paths = _by_split(shard_paths(spec), spec)
    found: dict[str, tuple[list[TarMember], list[str | None], list[TarMember], list[str]]] = {}
    total = sum(len(p) for p in paths.values())
    with progress_bar(total, f"scanning {total} shards", progress, unit="shard") as bar:
        for split, shard_files in paths.items():
            members, texts, empty = [], [], []
            for path in shard_files:
                m, t, e = read_shard(path)
                members += m
                texts += t
                empty += e
                bar.update(1)
            found[split] = (members, texts, empty, [str(p) for p in shard_files])
    every = [t for _, texts, _, _ in found.values() for t in texts]
    if any(t is not None for t in every) and None in every:
        split = next(s for s, (_, texts, _, _) in found.items() if None in texts)
        member = found[split][0][found[split][1].index(None)]
        raise DatasetError(f"shard sample {member} has no label (.cls, or .json with \"label\") but others do; "
                           f"label every sample or none")
    labeled = bool(every) and every[0] is not None
    classes = _classes(every) if labeled else []
    index = {name: i for i, name in enumerate(classes)}
    if labeled:
        train = set(found["train"][1])
        for split, (_, texts, _, _) in found.items():
            extra = sorted(set(texts) - train)
            if extra:
                raise DatasetError(f"shards:{spec}: {split} holds classes that train has not ({extra[:5]}); give "
                                   f"train shards of every class")
    return {split: ShardSet(members, torch.as_tensor([index[t] for t in texts], dtype=torch.int64) if labeled
                            else None, classes, unreadable=[Path(str(m)) for m in empty], shards=shard_files)
            for split, (members, texts, empty, shard_files) in found.items()}
