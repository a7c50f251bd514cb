"""SimCLR views: batched on the device vs per-sample pipelines.

    python scripts/benchmark.py augment                  # batch 256, 32 px CIFAR-10, 2 and 0 workers
    python scripts/benchmark.py augment --folder <dir>   # also FolderBatches streaming an image folder

Two views per source image, in pairs/s. reprlab: ``ViewAugment.views`` on a uint8 batch already on the device
(what engine.fit runs each step). Peers, per sample: torchvision transforms on PIL images, torchvision
transforms.v2 on uint8 tensors, lightly's SimCLRTransform (bench.peers), at the same strengths. Prints a table
and appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from bench import peers
from bench.common import environment, log, print_table, summarize, throughput
from bench.speed_setup import add_common_arguments, endless, lightly_dataset, load_images, run_and_record, timing
from reprlab.data.loader import Batches
from reprlab.data.views import ViewAugment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--folder", default=None,
                        help="also time FolderBatches streaming this image folder (decode + resize)")


def main(args: argparse.Namespace) -> int:
    return run_and_record(args, run)


def torchvision_simclr_transform(size: int, tensor_input: bool) -> Callable:
    """The usual per-sample SimCLR pipeline from torchvision transforms (PIL v1, or v2 on uint8 tensors)."""
    if tensor_input:
        from torchvision.transforms import v2

        return v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(p=0.2),
            v2.ToDtype(torch.float32, scale=True),
        ])
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        transforms.RandomGrayscale(p=0.2), transforms.ToTensor(),
    ])


def peer_pipelines(args: argparse.Namespace, data: Any, augment: ViewAugment) -> list[tuple[str, Any]]:
    """(name, per-sample dataset) of each peer pipeline."""
    size = args.image_size
    pipelines = [
        ("torchvision transforms (PIL), per sample",
         peers.PerSampleViews(data.images, data.labels, torchvision_simclr_transform(size, False), two_calls=True)),
        ("torchvision transforms.v2 (uint8 tensor), per sample",
         peers.PerSampleViews(data.images, data.labels, torchvision_simclr_transform(size, True), as_pil=False,
                              two_calls=True)),
    ]
    if args.lightly and peers.lightly_available():
        pipelines.append(("lightly SimCLRTransform (PIL), per sample", lightly_dataset(data, augment, size)))
    elif args.lightly:
        log(peers.LIGHTLY_MISSING)
    return pipelines


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    size, batch = args.image_size, args.batch_size
    data = load_images(args.data, args.limit, args.seed, size)
    augment = ViewAugment()  # SimCLR's default pipeline; the images are already at --image-size
    stream = endless(Batches(data, batch, seed=args.seed))
    stats = throughput(lambda: augment.views(next(stream)["images"].to(device), n=2), batch, device=device,
                       **timing(args))
    rows = [{"pipeline": "reprlab ViewAugment, batched", "where": str(device), "pairs_per_s": stats["median"],
             "runs": stats["runs"]}]
    log(f"reprlab batched: {stats['median']:.0f} pairs/s")
    for name, dataset in peer_pipelines(args, data, augment):
        for workers in args.workers:
            stats = summarize([peers.loader_rate(dataset, batch, workers, args.warmup, args.steps)
                               for _ in range(args.repeats)])
            rows.append({"pipeline": name, "where": f"DataLoader, {workers} workers",
                         "pairs_per_s": stats["median"], "runs": stats["runs"]})
            log(f"{name} workers={workers}: {stats['median']:.0f} pairs/s")
    for row in rows:
        row["reprlab_ratio"] = rows[0]["pairs_per_s"] / row["pairs_per_s"]
    ratios = {f"reprlab / {r['pipeline']} ({r['where']})": r["reprlab_ratio"] for r in rows[1:]}
    print_table(rows, ["pipeline", "where", "pairs_per_s", "reprlab_ratio"],
                title=f"SimCLR augmentation, two views per image, batch {batch}, {size} px")
    streamed = folder_stream(args) if args.folder else None
    return {"bench": "augment", "env": environment(), "args": vars(args), "results": rows, "ratios": ratios,
            "folder_stream": streamed}


def folder_stream(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s that FolderBatches delivers from image files (decode + resize in workers, uint8 batches):
    the rate at which a folder too large for memory can feed the device-side augmentation."""
    from reprlab.data.stream import FolderBatches

    rows = []
    for workers in args.workers:
        batches = FolderBatches(args.folder, image_size=args.image_size, batch_size=args.batch_size,
                                num_workers=workers, drop_last=False, seed=args.seed)

        def block(batches: FolderBatches = batches) -> float:
            count, start, stream = 0, 0.0, endless(batches)
            for step in range(args.warmup + args.steps):
                if step == args.warmup:
                    start = time.perf_counter()
                images = next(stream)["images"]
                count += len(images) if step >= args.warmup else 0
            stream.close()
            return count / (time.perf_counter() - start)

        stats = summarize([block() for _ in range(args.repeats)])
        rows.append({"pipeline": "reprlab FolderBatches (decode + resize)", "where": f"{workers} workers",
                     "images_per_s": stats["median"], "runs": stats["runs"]})
        log(f"FolderBatches workers={workers}: {stats['median']:.0f} images/s")
    print_table(rows, ["pipeline", "where", "images_per_s"],
                title=f"streaming {len(batches.files)} files from {args.folder} at {args.image_size} px")
    return rows
