"""Shared helpers for the benchmarks in scripts/bench/: timing, FLOP rates, peak memory, output.

Claims are ratios taken side by side in one run (shared machines drift: the sgemm rate of a 2-core box moved
95-184 GFLOP/s within a day), so every benchmark measures its own sgemm reference with :func:`sgemm_gflops`.

- :func:`throughput`: warm up once, then ``repeats`` timed blocks of ``steps`` calls; median items/s.
- :func:`sgemm_gflops`: the matmul rate (fp32 or bf16) measured now, the yardstick for achieved GFLOP/s.
- :func:`forward_flops`: FLOPs of one forward pass per example (``torch.utils.flop_counter``).
- :class:`PeakMemory`: peak resident memory of this process inside a ``with`` block (CUDA: peak allocated).
- :func:`tune_glibc_malloc`: keep freed blocks in the heap (fewer page faults per step on Linux CPUs).
- :func:`print_table`, :func:`append_jsonl` (strict JSON), :func:`environment`, :func:`log`: output.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reprlab.hardware import processor

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------- timing


def sync(device: torch.device | str | None) -> None:
    """Wait for queued device work, so wall-clock timings cover it (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """{"median", "min", "max", "runs"} of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": [round(v, 3) for v in values]}


def throughput(step: Callable[[], Any], items_per_step: float, *, warmup: int, steps: int, repeats: int,
               device: torch.device | str | None = None) -> dict[str, Any]:
    """Items per second of ``step()``: ``warmup`` untimed calls, then ``repeats`` timed blocks of ``steps``.

    Blocks rather than single calls so that asynchronous work (CUDA, prefetching loaders) is fully counted;
    the median over blocks resists the bursts of other processes on a shared machine.
    """
    for _ in range(warmup):
        step()
    sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * items_per_step / (time.perf_counter() - start))
    return summarize(rates)


def timed_blocks(block: Callable[[], float], repeats: int) -> dict[str, Any]:
    """Summary of ``repeats`` calls of ``block() -> rate`` (for measurements that time themselves)."""
    return summarize([block() for _ in range(repeats)])


# --------------------------------------------------------------------------------------------- FLOPs


def sgemm_gflops(n: int = 2048, reps: int = 5, repeats: int = 3, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> float:
    """Median GFLOP/s of an n x n x n matmul in ``dtype`` measured now (2 n^3 FLOPs per product)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    a @ b  # first call pays for allocation and kernel selection
    sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        rates.append(2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def forward_flops(model: nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one forward pass per example (matmuls and convolutions, as FlopCounterMode counts them).

    A training step costs about 3x this (forward, and backward for inputs and weights)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops() / example.shape[0]


# --------------------------------------------------------------------------------------------- memory


def _status_mb(field: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # reported in kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory inside a ``with`` block, in MiB: ``peak_mb`` and ``delta_mb`` (peak minus the start).

    CPU: the process's peak resident set (VmHWM, reset at entry on Linux; elsewhere ``ru_maxrss``, a
    lifetime peak, flagged by ``method``). DataLoader worker processes are not included: compare runs
    with the same number of workers. CUDA: ``torch.cuda.max_memory_allocated`` (tensors only).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_mb = self.start_mb = self.delta_mb = float("nan")
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_peak_rss() and _status_mb("VmHWM") is not None:
            self.start_mb = _status_mb("VmRSS")
            self.method = "VmHWM (reset at start)"
        else:
            self.start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
            self.method = "ru_maxrss (process lifetime)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method.startswith("VmHWM"):
            self.peak_mb = _status_mb("VmHWM")
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.delta_mb = self.peak_mb - self.start_mb

    def as_dict(self) -> dict[str, Any]:
        return {"peak_mb": round(self.peak_mb, 1), "delta_mb": round(self.delta_mb, 1), "method": self.method}


def tune_glibc_malloc(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**30) -> bool:
    """Keep freed tensor memory in this process's heap (glibc only; returns False elsewhere).

    By default glibc serves blocks above 128 KiB with fresh mmaps and trims the heap top, so every step
    page-faults its activations and augmented views in again; raising both thresholds measured 1.3-1.5x
    faster batched augmentation on a 2-core VM. Process-wide and permanent: rows timed after this call
    (any framework) run with it, which ``environment()`` records; freed memory then stays resident, so
    :class:`PeakMemory` deltas of later rows understate (compare ``peak_mb`` of a run without it).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    ok = libc.mallopt(m_mmap_threshold, mmap_threshold) == 1
    ok = libc.mallopt(m_trim_threshold, trim_threshold) == 1 and ok
    os.environ["REPRLAB_BENCH_MALLOC_TUNED"] = "1" if ok else "0"
    return ok


# --------------------------------------------------------------------------------------------- output


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """What a figure depends on: versions, threads, CPU, GPU, commit, time."""
    import torchvision

    env = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": processor(),  # model name and the flags that decide precision (avx512_bf16, amx, avx2)
    }
    env["malloc_tuned"] = os.environ.get("REPRLAB_BENCH_MALLOC_TUNED") == "1"
    env["ld_preload"] = os.environ.get("LD_PRELOAD")  # jemalloc / tcmalloc change CPU timings too
    return env


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None,
                file: Any = None) -> None:
    """A plain-text table of ``rows`` (dicts) in the order of ``columns``; floats get 4 significant digits."""
    file = file or sys.stdout

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}", file=file)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        aligned = (v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
        print("  ".join(aligned), file=file)


def finite(value: Any) -> Any:
    """``value`` with NaN / inf floats (in nested dicts, lists, tuples) replaced by None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def append_jsonl(path: str | Path, record: dict[str, Any]) -> Path:
    """Append ``record`` as one strict JSON line to ``path`` (non-finite floats as null, parents created), with
    the processor it ran on (``reprlab.hardware.processor``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"processor": processor(), **record}  # every line says which machine it was measured on
    with open(path, "a") as f:
        f.write(json.dumps(finite(record), default=str) + "\n")
    return path


def log(*parts: Any) -> None:
    """Progress to stderr, so stdout stays the table."""
    print(*parts, file=sys.stderr, flush=True)
