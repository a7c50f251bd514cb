"""The data benchmark's files and processes: CIFAR-10 written as a JPEG folder (and tar shards), folders of the
first N files (hard links), and the fresh process whose peak memory is measured (scripts/bench/data.py)."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS = Path(__file__).resolve().parents[1]
_KB = 1024 if sys.platform != "darwin" else 1  # ru_maxrss: KB on Linux, bytes on macOS
# Linux carries a process's peak RSS over fork + exec (the peak of the process it was forked from counts as its
# own), so the measured process is started by this small interpreter, not by the benchmark (torch and three
# loaders imported: 800 MB): its peak is then its own.
_WRAPPER = ("import subprocess, sys; "
            "sys.exit(subprocess.run(sys.argv[1:]).returncode)")


# --------------------------------------------------------------------------------------------- writing


def _write_chunk(root: str, size: int, quality: int, start: int, images: np.ndarray, labels: np.ndarray,
                 classes: list[str]) -> int:
    """Images ``start, start + 1, ...`` as ``root/<class>/<index:07d>.jpg`` (bicubic upscale when size > 32)."""
    from PIL import Image

    for k, (array, label) in enumerate(zip(images, labels)):
        image = Image.fromarray(array)
        if image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        image.save(Path(root, classes[label], f"{start + k:07d}.jpg"), quality=quality)
    return len(images)


def write_jpegs(out: Path, cifar: Path, size: int, count: int, quality: int, procs: int,
                chunk: int = 1000) -> dict[str, Any]:
    """CIFAR-10's train images as ``out/<class>/<index>.jpg`` at ``size`` px, ``count`` of them (image
    ``index % 50000``: repeated with distinct names past 50k), by ``procs`` processes; returns what was written."""
    with np.load(cifar / "train.npz", allow_pickle=False) as f:
        images, labels = f["images"], f["labels"].astype(np.int64)
        classes = [str(c) for c in f["classes"]] if "classes" in f.files else [str(c) for c in range(10)]
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=procs) as pool:
        jobs = []
        for start in range(0, count, chunk):
            source = np.arange(start, min(start + chunk, count)) % len(images)
            jobs.append(pool.submit(_write_chunk, str(out), size, quality, start, images[source], labels[source],
                                    classes))
        written = sum(job.result() for job in jobs)
    seconds = time.perf_counter() - started
    return {"folder": str(out), "images": written, "size": size, "quality": quality, "procs": procs,
            "seconds": seconds, "bytes": sum(p.stat().st_size for p in out.rglob("*.jpg"))}


def _write_shard(path: str, files: list[tuple[str, int]]) -> int:
    with tarfile.open(path, "w") as tar:
        for file, label in files:
            key = Path(file).stem
            tar.add(file, f"{key}.jpg")
            info = tarfile.TarInfo(f"{key}.cls")
            data = str(label).encode()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return len(files)


def write_shards(folder: Path, out: Path, per_shard: int, procs: int) -> dict[str, Any]:
    """The JPEGs of ``folder`` (class sub-folders) packed into ``out/shard-NNNNNN.tar`` of ``per_shard`` samples
    (an image and its .cls label), in index order (CIFAR's classes interleaved)."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = sorted(((str(p), c) for c, name in enumerate(classes) for p in (folder / name).glob("*.jpg")),
                   key=lambda item: Path(item[0]).name)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=procs) as pool:
        jobs = [pool.submit(_write_shard, str(out / f"shard-{k:06d}.tar"), files[start : start + per_shard])
                for k, start in enumerate(range(0, len(files), per_shard))]
        written = sum(job.result() for job in jobs)
    return {"shards_dir": str(out), "shards": len(jobs), "samples": written, "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------- subsets


def first_files(folder: Path, n: int) -> Path:
    """``folder`` itself when it holds at most ``n`` images, else ``<folder>.rss-<n>/``: hard links (symbolic
    where the filesystem refuses) to the first ``n`` images, the same share of every class; made once."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {c: sorted(c.glob("*.jpg")) for c in classes}
    total = sum(len(f) for f in files.values())
    if n >= total:
        return folder
    out = folder.with_name(f"{folder.name}.rss-{n}")
    if out.is_dir() and sum(1 for _ in out.rglob("*.jpg")) == n:
        return out
    per_class = [n * len(files[c]) // total for c in classes]
    per_class[0] += n - sum(per_class)
    for c, take in zip(classes, per_class):
        (out / c.name).mkdir(parents=True, exist_ok=True)
        for src in files[c][:take]:
            dst = out / c.name / src.name
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    os.symlink(src, dst)
    return out


# --------------------------------------------------------------------------------------------- peak memory


def _tree_pss_mb(pid: int) -> float | None:
    """PSS (shared pages split between the processes) of the descendants of ``pid``, in MB."""
    import psutil

    try:
        total = 0
        for process in psutil.Process(pid).children(recursive=True):  # the wrapper's: the measured tree
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                continue
        return total / 2**20
    except psutil.NoSuchProcess:
        return None


def measure_child(settings: dict[str, Any], interval: float = 0.1, timeout: float = 3600) -> dict[str, Any]:
    """Run :func:`child_main` with ``settings`` in a fresh interpreter; its own report (peak RSS of the main
    process and of its largest worker, from getrusage) plus, with psutil, the peak PSS of the whole process tree
    sampled every ``interval`` s. Started through a small wrapper process (see ``_WRAPPER``)."""
    code = f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); from bench.data_files import child_main; child_main()"
    process = subprocess.Popen([sys.executable, "-c", _WRAPPER, sys.executable, "-c", code, json.dumps(settings)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: list[float] = []
    try:
        import psutil  # noqa: F401 - optional: the benchmark says when the tree's PSS was not sampled

        def sample() -> None:
            while process.poll() is None:
                value = _tree_pss_mb(process.pid)
                if value is not None:
                    peak.append(value)
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    except ImportError:
        sampler = None
    out, err = process.communicate(timeout=timeout)
    if sampler is not None:
        sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"the measured process failed ({process.returncode}):\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    report["tree_pss_peak_mb"] = max(peak) if peak else None
    return report


def _reprlab_batches(settings: dict[str, Any]) -> tuple[Any, Any]:
    from reprlab.data.datasets import load_dataset
    from reprlab.stages.common import build_batches

    name = settings["source"]
    data = load_dataset(name, image_size=settings["image_size"], val_fraction=0, stream=True,
                        workers=settings["workers"], progress=False)
    batches = build_batches(data.train, settings["batch_size"], shuffle=True, drop_last=True, seed=0)
    return data.train, batches.epoch(0)


def _torchvision_batches(settings: dict[str, Any]) -> tuple[Any, Any]:
    import torch
    from torchvision import datasets

    from bench.data import pil_transform

    dataset = datasets.ImageFolder(settings["source"].split(":", 1)[1], transform=pil_transform(settings["image_size"]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings["batch_size"], shuffle=True,
                                         num_workers=settings["workers"], drop_last=True)
    return dataset, iter(loader)


def child_main() -> None:
    """In the measured process: scan ``source`` and stream its first ``batches`` batches with ``pipeline``;
    print one JSON line (peak RSS of this process and of its largest worker, scan and stream seconds)."""
    settings = json.loads(sys.argv[1])
    if settings["pipeline"] == "reprlab":
        import reprlab.stages.common  # noqa: F401 - the imports, apart from what the files cost
        from reprlab.data.decode import preload

        preload()  # torchvision, as the other side has it imported

        build = _reprlab_batches
    else:
        import torchvision.datasets  # noqa: F401

        import bench.data  # noqa: F401

        build = _torchvision_batches
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KB / 2**20
    started = time.perf_counter()
    dataset, stream = build(settings)
    scanned = time.perf_counter()
    seen = 0
    for k, batch in enumerate(stream):
        seen += len(batch["images"] if isinstance(batch, dict) else batch[0])
        if k + 1 == settings["batches"]:
            break
    del stream  # the workers exit (and are waited for) here: RUSAGE_CHILDREN then counts them
    import gc

    gc.collect()
    print(json.dumps({"files": len(dataset), "images_streamed": seen, "scan_s": scanned - started,
                      "stream_s": time.perf_counter() - scanned, "after_import_mb": imported,
                      "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KB / 2**20,
                      "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _KB / 2**20}))
