"""Exact and approximate top-k search backends for :func:`reprlab.evaluate.knn.knn_search`.

Exact search on the CPU has three implementations whose speed order depends on the processor and the BLAS:
``faiss`` (``IndexFlatIP.search``: faiss's own BLAS and heaps), ``faiss_heap`` (torch's BLAS for the
similarities, faiss's heaps for the top k) and ``torch`` (torch's BLAS and ``torch.topk``). ``auto``
(:func:`auto_exact_cpu_search`) times the three on slices of the caller's own first queries, keeps their results
and searches the rest with the fastest, so the default is the fastest exact path of the machine it runs on at
about one extra slice of work (``python scripts/benchmark.py knn``). All
three return the same neighbours (tests/test_knn.py).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

EXACT_CPU = ("faiss", "faiss_heap", "torch")
# faiss GPU brute-force search supports k up to 2048; above that we stay on the CPU.
_FAISS_GPU_MAX_K = 2048


def _similarity_chunks(bank: Tensor, queries: Tensor, chunk_size: int) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(start, stop, queries[start:stop] @ bank.T)`` per fixed query chunk (never 0), bounding memory at
    chunk_size x N. The chunks share one buffer, overwritten each time: a fresh (chunk, N) tensor per chunk is
    page-faulted in every time (``python scripts/benchmark.py knn``: torch reference vs ``backend="torch"``)."""
    num_queries = queries.shape[0]
    chunk_size = max(1, min(int(chunk_size), num_queries))
    buffer = torch.empty(chunk_size, bank.shape[0], dtype=queries.dtype, device=queries.device)
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        yield start, stop, torch.mm(queries[start:stop], bank.T, out=buffer[: stop - start])


def torch_search(bank: Tensor, queries: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Exact search: chunked matmul + ``torch.topk``, written into preallocated outputs."""
    sims = torch.empty(queries.shape[0], k, dtype=queries.dtype, device=queries.device)
    idx = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    for start, stop, chunk_sims in _similarity_chunks(bank, queries, chunk_size):
        torch.topk(chunk_sims, k, dim=1, largest=True, sorted=True, out=(sims[start:stop], idx[start:stop]))
    return sims, idx


def faiss_gpu_usable(queries: Tensor | np.ndarray, k: int) -> bool:
    if not (isinstance(queries, Tensor) and queries.is_cuda and k <= _FAISS_GPU_MAX_K):
        return False
    try:
        return import_faiss().get_num_gpus() > 0
    except ImportError:
        return False


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> Any:
    import faiss

    return faiss.StandardGpuResources()  # allocates scratch memory once per process, so cache it


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss is a dependency
        raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu (or faiss-gpu)") from error
    return faiss


def _build_index(
    bank: np.ndarray,
    index: str,
    nlist: int | None,
    nprobe: int | None,
    hnsw_m: int,
    ef_search: int | None,
    k: int,
) -> Any:
    faiss = import_faiss()
    num_bank, dim = bank.shape
    if index == "flat":
        built = faiss.IndexFlatIP(dim)
    elif index == "ivf":
        nlist = nlist or max(1, round(4 * math.sqrt(num_bank)))
        if not 1 <= nlist <= num_bank:
            raise ValueError(f"nlist={nlist} must be in [1, {num_bank}] (the bank size) for k-means training")
        quantizer = faiss.IndexFlatIP(dim)
        built = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        built.train(bank)
        built.nprobe = min(nlist, nprobe or max(1, round(math.sqrt(nlist))))
    else:
        built = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efSearch = ef_search or max(64, 2 * k)
    built.add(bank)
    return built


def faiss_search(
    bank: Tensor,
    queries: Tensor,
    k: int,
    index: str,
    nlist: int | None,
    nprobe: int | None,
    hnsw_m: int,
    ef_search: int | None,
    device: torch.device,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    faiss = import_faiss()
    use_gpu = device.type == "cuda" and index != "hnsw" and k <= _FAISS_GPU_MAX_K and faiss.get_num_gpus() > 0
    bank_np = np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32)
    queries_np = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
    built = _build_index(bank_np, index, nlist, nprobe, hnsw_m, ef_search, k)
    # HNSW has no GPU implementation; flat/IVF move to the GPU when the caller works on CUDA.
    if use_gpu:
        built = faiss.index_cpu_to_gpu(_gpu_resources(), device.index or 0, built)
    sims_np, idx_np = built.search(queries_np, k)  # (Q, k) each
    sims, idx = torch.from_numpy(sims_np), torch.from_numpy(idx_np).long()
    return sims.masked_fill(idx < 0, float("-inf")), idx


def faiss_heap_search(bank: Tensor, queries: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Exact CPU search as ``IndexFlatIP`` does it (a BLAS product per query chunk, then a top-k heap per
    query), with torch's BLAS for the product and faiss's heaps for the selection."""
    faiss = import_faiss()
    bank, queries = bank.float().contiguous(), queries.float().contiguous()
    sims = np.empty((queries.shape[0], k), dtype=np.float32)
    idx = np.empty((queries.shape[0], k), dtype=np.int64)
    for start, stop, chunk_sims in _similarity_chunks(bank, queries, chunk_size):
        heaps = faiss.float_minheap_array_t()  # a min-heap per query keeps its k largest similarities
        heaps.k, heaps.nh = k, stop - start
        heaps.val, heaps.ids = faiss.swig_ptr(sims[start:stop]), faiss.swig_ptr(idx[start:stop])
        heaps.heapify()
        heaps.addn(bank.shape[0], faiss.swig_ptr(chunk_sims.numpy()))
        heaps.reorder()  # heap order -> sorted by decreasing similarity
    return torch.from_numpy(sims), torch.from_numpy(idx)




# Below this many (bank x query) pairs a search takes milliseconds whichever backend runs it: faiss, no probe.
_PROBE_MIN_PAIRS = 50_000_000
_PROBE_QUERIES = 1024  # one query chunk: a 256-query slice misjudged the full search (cache effects)
# Another backend replaces faiss only when its probe is this much faster: two timings of one backend on one
# 2-core machine (an AMX Xeon) differed by up to 15%, and there a noisy probe picked backends 7-14% slower.
_PROBE_MARGIN = 1.1
_chosen: dict[tuple[int, int, int, int], str] = {}


def fastest(times: dict[str, float]) -> str:
    """The backend a probe chooses from its ``times`` (seconds): faiss unless another beats it by the margin."""
    best = min(times, key=times.__getitem__)
    return best if "faiss" not in times or times[best] * _PROBE_MARGIN < times["faiss"] else "faiss"


def auto_exact_cpu_search(bank: Tensor, queries: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Exact top-k on the CPU with the fastest of :data:`EXACT_CPU` for this problem on this machine.

    Their order depends on the processor, its BLAS and the bank's size against the caches (faiss flat was 1.35x
    faster than the others on one 2-core EPYC and 4.4x slower on another), so a probe on a small synthetic bank
    misleads. Instead each backend searches its own slice of the first ``3 x 1024`` real queries against the real
    bank, timed after a tiny warm-up; those results are kept, and the fastest (:func:`fastest`) searches the
    rest. The choice is cached per process for the bank size (power of two), dimension, k (power of two) and
    thread count. Small problems, and searches of fewer than 3x the probed queries, go to faiss without a probe."""
    bank, queries = bank.detach().cpu().float().contiguous(), queries.detach().cpu().float().contiguous()
    num_bank, num_queries = bank.shape[0], queries.shape[0]
    key = (num_bank.bit_length(), bank.shape[1], max(0, k - 1).bit_length(), torch.get_num_threads())
    probe = _PROBE_QUERIES * len(EXACT_CPU)
    if key in _chosen or num_bank * num_queries < _PROBE_MIN_PAIRS or num_queries < 3 * probe:
        return exact_cpu_search(_chosen.get(key, "faiss"), bank, queries, k, chunk_size)
    times, parts = {}, []
    for i, name in enumerate(EXACT_CPU):
        rows = queries[i * _PROBE_QUERIES:(i + 1) * _PROBE_QUERIES]
        exact_cpu_search(name, bank[: 4 * k], rows[:8], k, chunk_size)  # warm-up: thread pools, first calls
        start = time.perf_counter()
        parts.append(exact_cpu_search(name, bank, rows, k, chunk_size))
        times[name] = time.perf_counter() - start
    _chosen[key] = fastest(times)
    parts.append(exact_cpu_search(_chosen[key], bank, queries[probe:], k, chunk_size))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def chosen_backends() -> dict[tuple[int, int, int, int], str]:
    """The backends ``auto`` chose in this process, by (bank size bits, dim, k bits, threads)."""
    return dict(_chosen)


def exact_cpu_search(backend: str, bank: Tensor, queries: Tensor, k: int,
                     chunk_size: int) -> tuple[Tensor, Tensor]:
    """Exact top-k on the CPU with one of :data:`EXACT_CPU` (inputs L2-normalised float32)."""
    bank, queries = bank.detach().cpu().float().contiguous(), queries.detach().cpu().float().contiguous()
    if backend == "torch":
        return torch_search(bank, queries, k, chunk_size)
    if backend == "faiss_heap":
        return faiss_heap_search(bank, queries, k, chunk_size)
    return faiss_search(bank, queries, k, "flat", None, None, 32, None, torch.device("cpu"), chunk_size)
