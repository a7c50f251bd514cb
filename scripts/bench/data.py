"""Image-file loading: reprlab's stream vs torchvision ImageFolder + PIL, the decode floor, peak RSS by files.

    python scripts/benchmark.py data --write /tmp/c10-224 --size 224 --count 50000 --shards  # write the data
    python scripts/benchmark.py data --folder /tmp/c10-224 --image-size 224 --workers 2      # images/s
    python scripts/benchmark.py data --folder /tmp/c10-224 --image-size 224 --rss 10000 50000 100000 --no-speed

``--write DIR``: CIFAR-10's 50,000 train images (``--cifar``) as JPEGs (quality 90) in class sub-folders, at
32 px or upscaled (bicubic) to ``--size``; ``--count`` of them (past 50,000 the images repeat under distinct
names), by ``--procs`` processes; ``--shards`` also packs them into tar shards in ``DIR-shards/``.

Images/s delivered to the training loop as uint8 batches of ``--image-size`` (a pass of ``--batches`` batches
per repeat, the first ``--warmup`` not timed; the time to the first batch reported apart): reprlab's streamed
loader as pretraining builds it (``load_dataset(..., stream=True)`` + ``stages.common.build_batches``, at
``data.workers = --workers``; FolderBatches over the folder, ShardBatches over ``DIR-shards/`` when it exists),
beside torchvision ``ImageFolder`` + PIL (``Resize`` + ``CenterCrop`` + ``PILToTensor``: the same uint8 size) +
``DataLoader`` and lightly's ``LightlyDataset`` (the same transform), at the same workers and batch size. Beside
them, in one process and one thread, the per-image floor: ``torchvision.io.decode_jpeg`` of one file's bytes in
a loop, PIL ``open`` + ``convert("RGB")``, and each pipeline's whole per-image work.

Peak RSS (``--rss N ...``): for each N a fresh process scans a folder of the folder's first N files (hard links
in ``<folder>.rss-N/``, the same share of each class) and streams ``--rss-batches`` batches; its own peak
(``ru_maxrss``), its largest worker's (``RUSAGE_CHILDREN``) and, with psutil, the peak PSS of the whole process
tree (sampled every 0.1 s), for reprlab and for ImageFolder. Prints markdown tables and appends one JSON line to
``--out``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO_ROOT, append_jsonl, environment, log
from bench.data_files import first_files, measure_child, write_jpegs, write_shards

DEFAULT_OUT = "benchmarks/results.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--write", type=Path, default=None, help="write CIFAR-10 as a JPEG folder here first")
    parser.add_argument("--cifar", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cifar10",
                        help="train.npz with uint8 NHWC images, labels, classes")
    parser.add_argument("--size", type=int, default=32, help="--write: side of the written JPEGs (32: native)")
    parser.add_argument("--count", type=int, default=50_000, help="--write: images to write")
    parser.add_argument("--quality", type=int, default=90, help="--write: JPEG quality")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="--write: writing processes")
    parser.add_argument("--shards", action="store_true", help="--write: also pack tar shards into DIR-shards/")
    parser.add_argument("--shard-size", type=int, default=5000, help="--write: samples per tar shard")
    parser.add_argument("--folder", type=Path, default=None, help="the JPEG folder to measure (default: --write)")
    parser.add_argument("--image-size", type=int, default=None, help="side of the delivered batches "
                                                                     "(default: --size)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers on every side")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20, help="batches per timed pass")
    parser.add_argument("--warmup", type=int, default=2, help="batches of each pass not timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline (median reported)")
    parser.add_argument("--floor-images", type=int, default=500, help="loop length of the per-image floor")
    parser.add_argument("--no-speed", action="store_true", help="skip the images/s and floor measurements")
    parser.add_argument("--no-lightly", action="store_true", help="leave lightly's LightlyDataset out")
    parser.add_argument("--rss", type=int, nargs="*", default=[], help="peak RSS at these file counts")
    parser.add_argument("--rss-batches", type=int, default=20, help="batches each RSS process streams")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON lines file to append the result to")


def pil_transform(size: int) -> Callable:
    """torchvision's PIL path to the uint8 (3, size, size) reprlab delivers: shorter side, centre crop."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])


def markdown(rows: list[dict[str, Any]], columns: list[str], title: str) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return "" if value is None else str(value)

    lines = [f"\n**{title}**\n", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- images/s


def timed_pass(batches: Iterator, count: int, warmup: int) -> tuple[float, float]:
    """(images/s of one pass over batches ``warmup + 1 .. count`` (the clock starts when batch ``warmup`` arrives),
    seconds to the first batch)."""
    started = time.perf_counter()
    first = timed_from = None
    images = 0
    for k, batch in enumerate(batches):
        now = time.perf_counter()
        first = now - started if first is None else first
        n = len(batch["images"] if isinstance(batch, dict) else batch[0])
        if k == warmup:
            timed_from = now
        elif timed_from is not None:
            images += n
        if k + 1 == count:
            break
    if timed_from is None or images == 0:
        raise ValueError(f"a pass gave fewer than {warmup + 2} batches: lower --warmup or --batch-size")
    return images / (time.perf_counter() - timed_from), first


def measure_pipeline(name: str, make: Callable[[int], Iterator], args: argparse.Namespace,
                     scan_s: float) -> dict[str, Any]:
    """Median images/s over ``--repeats`` passes of ``make(repeat)`` (a fresh loader each, as every epoch)."""
    rates, firsts = [], []
    for repeat in range(args.repeats):
        rate, first = timed_pass(make(repeat), args.batches, args.warmup)
        rates.append(rate)
        firsts.append(first)
    log(f"{name}: {statistics.median(rates):.0f} images/s (first batch after {statistics.median(firsts):.2f} s)")
    return {"pipeline": name, "workers": args.workers, "images_per_s": statistics.median(rates),
            "runs": [round(r, 1) for r in rates], "first_batch_s": statistics.median(firsts), "scan_s": scan_s}


def _reprlab(source: str, args: argparse.Namespace) -> tuple[Callable[[int], Iterator], float]:
    from reprlab.data.datasets import load_dataset
    from reprlab.stages.common import build_batches

    started = time.perf_counter()
    data = load_dataset(source, image_size=args.image_size, val_fraction=0, stream=True, workers=args.workers,
                        progress=False)
    batches = build_batches(data.train, args.batch_size, shuffle=True, drop_last=True, seed=0)
    return batches.epoch, time.perf_counter() - started


def _per_sample(dataset_class: Callable, args: argparse.Namespace) -> tuple[Callable[[int], Iterator], float]:
    started = time.perf_counter()
    dataset = dataset_class(str(args.folder), transform=pil_transform(args.image_size))
    scan_s = time.perf_counter() - started

    def make(repeat: int) -> Iterator:
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                             num_workers=args.workers, generator=torch.Generator().manual_seed(repeat))
        return iter(loader)

    return make, scan_s


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    from torchvision import datasets

    rows = []
    make, scan_s = _reprlab(f"folder:{args.folder}", args)
    rows.append(measure_pipeline("reprlab stream (FolderBatches)", make, args, scan_s))
    shards = args.folder.with_name(args.folder.name + "-shards")
    if shards.is_dir():
        make, scan_s = _reprlab(f"shards:{shards}", args)
        rows.append(measure_pipeline("reprlab stream (ShardBatches, tar shards)", make, args, scan_s))
    make, scan_s = _per_sample(datasets.ImageFolder, args)
    rows.append(measure_pipeline("torchvision ImageFolder + PIL + DataLoader", make, args, scan_s))
    if not args.no_lightly:
        try:
            from lightly.data import LightlyDataset
        except ImportError:
            log("lightly is not installed: its LightlyDataset row is left out")
        else:
            def lightly(folder: str, transform: Callable) -> Any:
                return LightlyDataset(input_dir=folder, transform=transform)

            make, scan_s = _per_sample(lightly, args)
            rows.append(measure_pipeline("lightly LightlyDataset + PIL + DataLoader", make, args, scan_s))
    reference = next(row["images_per_s"] for row in rows if row["pipeline"].startswith("torchvision"))
    for row in rows:
        row["vs_imagefolder"] = row["images_per_s"] / reference
    return rows


def _loop_rate(step: Callable[[], Any], n: int) -> float:
    step()
    started = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - started)


def floor(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-image rates in one process and one thread: the decode floor and each pipeline's whole work."""
    from PIL import Image
    from torchvision.io import decode_jpeg
    from torchvision.io import read_file as tv_read

    from reprlab.data.decode import decode_file

    path = next(p for p in sorted(args.folder.rglob("*.jpg")))
    data, encoded = path.read_bytes(), tv_read(str(path))
    transform = pil_transform(args.image_size)

    def pil_pipeline() -> Any:
        with open(path, "rb") as f:
            return transform(Image.open(f).convert("RGB"))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        rows = [
            ("torchvision.io.decode_jpeg (bytes in memory)", lambda: decode_jpeg(encoded)),
            ("PIL open + convert('RGB') (bytes in memory)", lambda: Image.open(io.BytesIO(data)).convert("RGB")),
            ("reprlab per image: read + decode + resize + crop", lambda: decode_file(path, args.image_size)),
            ("torchvision per image: PIL open + Resize + CenterCrop + PILToTensor", pil_pipeline),
        ]
        out = [{"what": what, "images_per_s": _loop_rate(step, args.floor_images)} for what, step in rows]
    finally:
        torch.set_num_threads(threads)
    for row in out:
        log(f"floor {row['what']}: {row['images_per_s']:.0f} images/s")
    return out


# --------------------------------------------------------------------------------------------- RSS, main


def rss(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.rss:
        folder = first_files(args.folder, n)
        for pipeline in ("reprlab", "torchvision"):
            report = measure_child({"source": f"folder:{folder}", "pipeline": pipeline, "workers": args.workers,
                                    "batch_size": args.batch_size, "batches": args.rss_batches,
                                    "image_size": args.image_size})
            rows.append({"pipeline": pipeline, **report})
            log(f"rss {pipeline} {report['files']} files: main {report['main_peak_mb']:.0f} MB, worker "
                f"{report['worker_peak_mb']:.0f} MB, tree PSS {report['tree_pss_peak_mb']} MB")
    return rows


def main(args: argparse.Namespace) -> int:
    record: dict[str, Any] = {"bench": "data", **environment()}
    if args.write is not None:
        record["written"] = write_jpegs(args.write, args.cifar, args.size, args.count, args.quality, args.procs)
        log(f"wrote {record['written']['images']} JPEGs to {args.write} in {record['written']['seconds']:.0f} s")
        if args.shards:
            record["written"].update(write_shards(args.write, args.write.with_name(args.write.name + "-shards"),
                                                  args.shard_size, args.procs))
            log(f"packed {record['written']['shards']} tar shards in {record['written']['seconds']:.0f} s")
    args.folder = args.folder or args.write
    args.image_size = args.image_size or args.size
    if args.folder is not None:
        if not args.no_speed:
            record["throughput"] = speed(args)
            record["floor"] = floor(args)
            print(markdown(record["throughput"], ["pipeline", "workers", "images_per_s", "vs_imagefolder",
                                                  "first_batch_s", "scan_s"],
                           f"Images/s to the training loop, {args.image_size} px uint8 batches of {args.batch_size}"))
            print(markdown(record["floor"], ["what", "images_per_s"], "Per-image floor (one process, one thread)"))
        if args.rss:
            record["rss"] = rss(args)
            print(markdown(record["rss"], ["pipeline", "files", "after_import_mb", "main_peak_mb", "worker_peak_mb",
                                           "tree_pss_peak_mb", "scan_s", "stream_s"],
                           f"Peak memory: scan + {args.rss_batches} batches of {args.batch_size}, "
                           f"{args.workers} workers, fresh process each"))
    record["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if {"written", "throughput", "rss"} & set(record):
        print(f"\nappended to {append_jsonl(args.out, record)}")
    return 0
