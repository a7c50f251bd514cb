"""kNN search over banks larger than memory: the bank read in chunks of rows, each searched exactly, the per-query
top k merged across chunks; or an approximate faiss index (IVF, HNSW) filled chunk by chunk.

:func:`reprlab.evaluate.knn.knn_search` comes here when the bank or the queries are a
:class:`~reprlab.evaluate.cache.FeatureArray` (an on-disk feature cache) or ``bank_chunk`` is smaller than the
bank. Exact search gives the neighbours of the in-memory search (tests/test_eval_scale.py): each chunk's top k
holds every member of the global top k that lies in that chunk, so merging the chunks' lists loses none. Memory:
one chunk of queries (``query_chunk`` rows), one of the bank (``bank_chunk``), the search backend's similarity
block, and the (Q, k) results. Each query chunk reads the bank once (sequentially: the OS page cache keeps it when
it fits).

An IVF index trains on a seeded sample of the bank (at most ``64 x nlist`` rows; the in-memory search trains on
the whole bank), so its neighbours differ from the in-memory IVF's: :func:`measure_recall` says how close to
exact either is, on a sample of queries.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab.data.progress import bar as progress_bar
from reprlab.evaluate import search
from reprlab.evaluate.cache import FeatureArray, row_chunks

_IVF_TRAIN_PER_LIST = 64  # k-means training rows per IVF list (faiss warns below 39)


def _bank_rows(bank: Tensor | FeatureArray, bank_chunk: int | None) -> int:
    if bank_chunk is not None:
        return max(1, int(bank_chunk))
    return bank.chunk_rows if isinstance(bank, FeatureArray) else max(1, len(bank))


def _merge(best: tuple[Tensor, Tensor] | None, sims: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` of two sorted neighbour lists per query."""
    if best is None:
        return sims, idx
    sims, idx = torch.cat([best[0], sims], dim=1), torch.cat([best[1], idx], dim=1)
    top, position = torch.topk(sims, min(k, sims.shape[1]), dim=1, largest=True, sorted=True)
    return top, idx.gather(1, position)


def _exact(bank: Tensor | FeatureArray, queries: Tensor, k: int, backend: str, bank_rows: int,
           chunk_size: int) -> tuple[Tensor, Tensor]:
    """Exact top ``k`` of normalised ``queries`` over every chunk of ``bank``, merged."""
    from reprlab.evaluate.knn import knn_search  # the in-memory search of each chunk

    best = None
    for start, stop, rows in row_chunks(bank, bank_rows):
        sims, idx = knn_search(rows, queries, min(k, stop - start), backend=backend, chunk_size=chunk_size)
        best = _merge(best, sims.cpu(), idx.cpu() + start, k)
    return best


def chunked_search(bank: Tensor | FeatureArray, queries: Tensor | FeatureArray, k_search: int, k_out: int,
                   backend: str = "auto", index: str = "flat", exclude_self: bool = False,
                   bank_chunk: int | None = None, query_chunk: int | None = None, progress: bool = False,
                   chunk_size: int = 1024, **index_options: Any) -> tuple[Tensor, Tensor]:
    """Top ``k_search`` neighbours (``k_out`` after dropping self) of every query, on the CPU; the arguments
    are those of :func:`reprlab.evaluate.knn.knn_search`, already checked there. ``bank_chunk`` /
    ``query_chunk``: rows read at once (default: a FeatureArray's ``chunk_rows``, a tensor whole)."""
    from reprlab.evaluate.knn import _drop_self

    bank_rows = _bank_rows(bank, bank_chunk)
    query_rows = max(1, int(query_chunk or _bank_rows(queries, bank_chunk)))
    built = None
    if index != "flat":
        built = build_index(bank, index, k_search, bank_rows, **index_options)
    parts = []
    with progress_bar(len(queries), f"kNN search ({len(bank)} bank rows)", progress, unit="query") as bar:
        for start, stop, rows in row_chunks(queries, query_rows):
            rows = F.normalize(rows, dim=1)
            if built is None:
                sims, idx = _exact(bank, rows, k_search, backend, bank_rows, chunk_size)
            else:
                sims, idx = _search_index(built, rows, k_search)
            if exclude_self:  # the own index of query i is start + i
                sims, idx = _drop_self(sims, idx - start, k_out)
                idx = idx + start
            parts.append((sims, idx))
            bar.update(stop - start)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _search_index(built: Any, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    sims_np, idx_np = built.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
    sims, idx = torch.from_numpy(sims_np), torch.from_numpy(idx_np).long()
    return sims.masked_fill(idx < 0, float("-inf")), idx


def build_index(bank: Tensor | FeatureArray, index: str, k: int, bank_rows: int, nlist: int | None = None,
                nprobe: int | None = None, hnsw_m: int = 32, ef_search: int | None = None,
                seed: int = 0) -> Any:
    """A faiss IVF or HNSW index (inner product) of the normalised ``bank``, added ``bank_rows`` at a time; IVF
    trains on a seeded sample of at most ``64 x nlist`` rows. Defaults as in :func:`knn_search`."""
    num_bank, dim = bank.shape
    if index == "ivf":
        nlist = nlist or max(1, round(4 * math.sqrt(num_bank)))
        if not 1 <= nlist <= num_bank:
            raise ValueError(f"nlist={nlist} must be in [1, {num_bank}] (the bank size) for k-means training")
        take = min(num_bank, _IVF_TRAIN_PER_LIST * nlist)
        sample = torch.randperm(num_bank, generator=torch.Generator().manual_seed(seed))[:take].sort().values
        train = F.normalize(bank[sample].float(), dim=1).numpy()
        built = search._build_index(train, index, nlist, nprobe, hnsw_m, ef_search, k)
        built.reset()  # keeps the trained centroids, drops the sample: the whole bank is added below
    else:
        built = search._build_index(np.empty((0, dim), np.float32), index, nlist, nprobe, hnsw_m, ef_search, k)
    for _, _, rows in row_chunks(bank, bank_rows):
        built.add(np.ascontiguousarray(F.normalize(rows, dim=1).numpy(), dtype=np.float32))
    return built


def measure_recall(bank: Tensor | FeatureArray, queries: Tensor | FeatureArray, k: int, index: str,
                   sample: int = 1000, seed: int = 0, bank_chunk: int | None = None,
                   **index_options: Any) -> dict[str, Any]:
    """Recall@k of the approximate ``index`` against exact search on a seeded sample of ``sample`` queries: the
    mean fraction of each query's exact top k that the index also returns. ``{"recall": r, "k", "queries",
    "index"}``, ready for ``metrics.json``."""
    from reprlab.evaluate.knn import knn_search

    if index == "flat":
        raise ValueError("index='flat' is exact; measure the recall of 'ivf' or 'hnsw'")
    chosen = torch.randperm(len(queries), generator=torch.Generator().manual_seed(seed))[:sample].sort().values
    rows = queries[chosen].float()
    if not len(rows):
        raise ValueError("no queries to measure recall on")
    _, exact = knn_search(bank, rows, k, backend="faiss", index="flat", bank_chunk=bank_chunk)
    _, approx = knn_search(bank, rows, k, backend="faiss", index=index, bank_chunk=bank_chunk, **index_options)
    found = (approx[:, :, None] == exact[:, None, :]).any(dim=1)  # (S, k'): an exact neighbour was found
    return {"recall": float(found.float().mean()), "k": int(exact.shape[1]), "queries": len(rows), "index": index}
