"""What every stage builds from its config the same way: seeds, the dataset and the encoder; and the checks of
the loaded data."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reprlab import distributed
from reprlab.checks import fail
from reprlab.config import DataConfig, EncoderConfig, TrainConfig
from reprlab.data.datasets import DatasetSplits, ImageSet, decode_split, load_dataset
from reprlab.data.files import FileSet, default_workers
from reprlab.data.loader import Batches
from reprlab.data.shard_stream import ShardBatches
from reprlab.data.shards import ShardSet
from reprlab.data.stream import FolderBatches
from reprlab.engine import FitOptions
from reprlab.models.encoders import Encoder, create_encoder


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (each rank passes its own seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_workers(cfg: DataConfig) -> int:
    """``data.workers``, or (null) the CPU cores shared by the processes of this node (torchrun)."""
    if cfg.workers is not None:
        return cfg.workers
    return max(1, default_workers() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def build_dataset(cfg: DataConfig, seed: int, progress: bool = True) -> DatasetSplits:
    """The dataset named by a ``data:`` section; ``seed`` draws the val / test splits and the ``limit`` subset.
    Prints one line (rank 0): images and classes per split, where each split came from, unreadable files,
    in memory or streamed. ``progress`` (``train.progress``): bars while scanning and decoding on rank 0 (on a
    terminal, once they last a second)."""
    data = load_dataset(cfg.name, root=cfg.root, download=cfg.download, val_fraction=cfg.val_fraction,
                        image_size=cfg.image_size, limit=cfg.limit, seed=seed, test_fraction=cfg.test_fraction,
                        stream=cfg.stream, memory_limit_gb=cfg.memory_limit_gb, workers=data_workers(cfg),
                        progress=progress and distributed.is_main())
    if distributed.is_main():
        print(data.summary(), flush=True)
    return data


def build_batches(split: ImageSet | FileSet, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int,
                  rank: int = 0, world_size: int = 1) -> Batches | FolderBatches | ShardBatches:
    """The batch source of a split: :class:`Batches` over decoded images, :class:`FolderBatches` streaming image
    files. Both take the order of ``reprlab.data.loader.epoch_order``: a streamed run sees the batches (order
    and pixels) of an in-memory one, resumes mid-epoch on the batch it stopped at, and DDP ranks get disjoint,
    equal shares. Tar shards stream through :class:`ShardBatches` (read in sequence: its own seeded order,
    replayed on resume)."""
    if isinstance(split, ShardSet):  # tar shards: read in sequence, shuffled by shard order and a buffer
        return ShardBatches(split, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank,
                            world_size=world_size, num_workers=split.workers)
    if isinstance(split, FileSet):
        return FolderBatches(files=split.files, labels=split.labels, classes=split.classes,
                             image_size=split.image_size, batch_size=batch_size, shuffle=shuffle,
                             drop_last=drop_last, seed=seed, rank=rank, world_size=world_size,
                             num_workers=split.workers)
    return Batches(split, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank,
                   world_size=world_size)


def in_memory(split: ImageSet | FileSet | None, max_images: int | None = None, seed: int = 0) -> ImageSet | None:
    """``split`` as decoded images: a streamed split is decoded (a fixed random subset of at most ``max_images``
    of it, when given: the small banks of a monitor); a decoded one is returned as it is."""
    if not isinstance(split, FileSet):
        return split
    if max_images is not None and len(split) > max_images:
        keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:max_images]
        split = split.subset(keep.sort().values)
    return decode_split(split)


def split_features(encoder: torch.nn.Module, split: ImageSet | FileSet, batch_size: int, device: torch.device,
                   shard: bool = False) -> torch.Tensor:
    """Features (N, D) of a split in its order: ``extract_features`` over decoded images, or over a stream
    decoded in its workers (under DDP with ``shard``: each rank streams its share, all get every row). A file of a
    streamed split that cannot be decoded is an error naming it (its row would be missing)."""
    from reprlab.data.files import DatasetError
    from reprlab.evaluate.features import extract_features

    if not isinstance(split, FileSet):
        return extract_features(encoder, split.images, batch_size, device, shard=shard)
    world = distributed.world_size() if shard else 1
    stream = FolderBatches(files=split.files, image_size=split.image_size, batch_size=min(batch_size, len(split)),
                           shuffle=False, drop_last=False, rank=distributed.rank() if world > 1 else 0,
                           world_size=world, num_workers=split.workers)
    parts = [(extract_features(encoder, batch["images"], batch_size, device), batch["index"])
             for batch in stream.epoch(0)]
    if stream.skipped:
        bad = sorted(stream.skipped)
        raise DatasetError(f"{len(bad)} image file(s) could not be decoded (first: {split.files[bad[0]]}); "
                           f"evaluation needs every image: remove them, or set data.stream=false (decoded in "
                           f"memory, unreadable files are dropped)")
    features, index = torch.cat([f for f, _ in parts]), torch.cat([i for _, i in parts])
    if world > 1:  # equal padded shares (FolderBatches' sharding): gather, then put every row in its place
        features = distributed.all_gather(features.to(device)).cpu()
        index = distributed.all_gather(index.to(device)).cpu()
    out = torch.empty(len(split), features.shape[1], dtype=features.dtype)
    out[index] = features  # padding repeats rows: the same features land twice
    return out


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """The encoder named by an ``encoder:`` (or ``arch:``) section."""
    return create_encoder(cfg.name, pretrained=cfg.pretrained, weights=cfg.weights, **cfg.kwargs)


def fit_options(cfg: TrainConfig, device: torch.device, run_dir: Path, identity: dict[str, Any],
                desc: str, hparams: dict[str, Any]) -> FitOptions:
    """The training loop's options from a ``train:`` section; ``hparams``: the whole config, for the loggers."""
    return FitOptions(epochs=cfg.epochs, device=device, run_dir=run_dir, precision=cfg.precision,
                      grad_clip=cfg.grad_clip, log_every=cfg.log_every,
                      checkpoint_every_steps=cfg.checkpoint_every_steps, resume=cfg.resume, identity=identity,
                      progress=cfg.progress, desc=desc, loggers=tuple(cfg.loggers), hparams=hparams,
                      channels_last=cfg.channels_last)


# What only the loaded data can tell, in the one-line form of reprlab.checks (the rest is checked before loading).


def check_classes(labels: torch.Tensor, dataset: str, stage: str) -> None:
    """Classification (fine-tuning, evaluation) needs at least two classes among the training labels."""
    found = len(labels.unique())
    if found < 2:
        fail("data.name", dataset, f"its training labels hold {found} class; {stage} needs at least 2 (one class "
                                   f"gives loss 0 and 100% accuracy); check the labels, data.limit or the dataset")


def check_labels_per_class(labels: torch.Tensor, per_class: int | None, key: str = "labels_per_class") -> None:
    """k-shot: every class must have at least ``per_class`` training images (after the validation split)."""
    if per_class is None:
        return
    classes, counts = labels.unique(return_counts=True)
    smallest = int(counts.argmin())
    if int(counts[smallest]) < per_class:
        fail(key, per_class, f"class {int(classes[smallest])} has only {int(counts[smallest])} training images "
                             f"(after data.limit and the validation split); use {key} <= {int(counts[smallest])}")


def check_batch_fits(batch_size: int, images: int, world: int, dataset: str, key: str = "train.batch_size") -> None:
    """One full batch per process must fit in the training split."""
    most = images // world * world
    if batch_size > most:
        fail(key, batch_size, f"more than the {images} training images of {dataset!r} (after data.limit and the "
                              f"validation split); use {key} <= {most}")


def check_batchnorm_batch(model: torch.nn.Module, groups: list[dict[str, Any]], per_process: int, batch_size: int,
                          world: int) -> None:
    """BatchNorm that trains (its parameters are in the optimizer ``groups``) needs 2+ images per process."""
    if per_process >= 2:
        return
    trained = {id(p) for group in groups for p in group["params"]}
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and any(id(p) in trained for p in m.parameters())
           for m in model.modules()):
        fail("train.batch_size", batch_size, f"BatchNorm layers that train would see {per_process} image per batch "
                                             f"and process (they need 2 or more); use train.batch_size >= "
                                             f"{2 * world}, or a policy that freezes them (policy.name=linear_probe)")
