"""Weighted k-nearest-neighbour evaluation on cached features.

Protocol of InstDisc (Wu et al., 2018) and DINO ``eval_knn.py`` (Caron et al., 2021): L2-normalised features,
cosine similarity, the k nearest bank items vote for their label with weight ``exp(sim / temperature)``.

Differences from the peers' copies of that code (see design/peers.md section 5):
- the search is chunked by a fixed number of queries, so 3 queries work as well as 3 million;
- classes come from the **bank** labels (sorted unique values), so non-contiguous labels and classes absent
  from the queries are fine;
- ``k`` larger than the bank means "the whole bank"; top-5 with fewer than 5 classes means top-C, and a class
  that got no vote (k < 5) never counts as predicted;
- leave-one-out (``exclude_self``) when the queries are the bank;
- exact search by the fastest backend of the machine (faiss ``IndexFlatIP``, torch BLAS + faiss heaps, or torch;
  reprlab.evaluate.search), faiss on the GPU, or IVF / HNSW for large banks; a pure-torch reference backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from reprlab.evaluate import search

BACKENDS = ("auto", "faiss", "faiss_heap", "torch")
INDEXES = ("flat", "ivf", "hnsw")
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def as_tensor(x: Tensor | np.ndarray, dtype: torch.dtype | None = None) -> Tensor:
    """Tensor view of ``x`` (numpy arrays are converted, tensors keep their device)."""
    tensor = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return tensor if dtype is None else tensor.to(dtype)


def normalize_features(x: Tensor | np.ndarray) -> Tensor:
    """float32, L2-normalised rows, so that inner product = cosine similarity."""
    x = as_tensor(x, torch.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D), got shape {tuple(x.shape)}; flatten or pool them first")
    return F.normalize(x, dim=1)


# ---------------------------------------------------------------------------------------------- search


def knn_search(
    bank: Tensor | np.ndarray,
    queries: Tensor | np.ndarray,
    k: int,
    backend: str = "auto",
    index: str = "flat",
    exclude_self: bool = False,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int | None = None,
    chunk_size: int = 1024,
    bank_chunk: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Top-k cosine neighbours of ``queries`` in ``bank``.

    Both inputs are L2-normalised here (``F.normalize``, float32), so callers may pass raw features.
    Returns ``(similarities, indices)``, each (Q, k') sorted by decreasing similarity, on the queries' device,
    with ``k' = min(k, N_bank)`` (``min(k, N_bank - 1)`` with ``exclude_self``): a ``k`` larger than the bank
    returns the whole bank rather than failing.

    backend: ``"faiss"`` (faiss's index: GPU when the queries are on CUDA and faiss sees a GPU, else CPU),
        ``"faiss_heap"`` (exact, CPU: torch's BLAS for the similarities, faiss's heaps for the top k),
        ``"torch"`` (the reference: chunks of ``chunk_size`` queries, matmul + ``topk``, on the queries'
        device) or ``"auto"``: on the CPU the fastest exact backend for this problem on this machine, timed on
        the first queries themselves (:func:`reprlab.evaluate.search.auto_exact_cpu_search`); on CUDA
        faiss-GPU when usable, else torch; faiss for the approximate indexes. ``python scripts/benchmark.py
        knn`` times them side by side.
    index: faiss index type. ``"flat"`` is exact (``IndexFlatIP``). ``"ivf"`` (``IndexIVFFlat``, ``nlist``
        defaults to ``4 * sqrt(N)``, trained on the bank; ``nprobe`` defaults to ``sqrt(nlist)``) and
        ``"hnsw"`` (``IndexHNSWFlat``, ``hnsw_m`` links, ``ef_search`` defaults to ``max(64, 2k)``) are
        approximate: use ``measure_recall`` to check them. An approximate index may find fewer than k' items
        for a query; those slots hold index -1 and similarity -inf.
    exclude_self: leave-one-out when ``queries`` IS ``bank`` (row i is item i): searches one more neighbour
        and drops each query's own index (by index, not by rank, so exact duplicates are handled).
    bank_chunk: search the bank ``bank_chunk`` rows at a time and merge the per-query top k
        (:func:`reprlab.evaluate.bank.chunked_search`: the same neighbours, memory bounded by the chunk); a
        :class:`~reprlab.evaluate.cache.FeatureArray` bank or query set (an on-disk feature cache) is always
        read so, by its ``chunk_rows``. ``progress``: a bar per query chunk there (on a terminal).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {sorted(BACKENDS)}")
    if index not in INDEXES:
        raise ValueError(f"unknown index {index!r}; choose from {sorted(INDEXES)}")
    if backend in ("torch", "faiss_heap") and index != "flat":
        raise ValueError(f"the {backend} backend is exact only; use backend='faiss' for index={index!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = queries.device if isinstance(queries, Tensor) else torch.device("cpu")
    chunked, bank, queries = _prepare(bank, queries, bank_chunk)
    k_out, k_search = _search_sizes(tuple(bank.shape), tuple(queries.shape), k, exclude_self)
    if k_out <= 0:  # a one-item bank queried by itself has no other neighbour
        empty = torch.empty(queries.shape[0], 0, device=device)
        return empty, empty.long()
    if chunked:
        from reprlab.evaluate.bank import chunked_search

        sims, idx = chunked_search(bank, queries, k_search, k_out, backend, index, exclude_self, bank_chunk,
                                   progress=progress, chunk_size=chunk_size, nlist=nlist, nprobe=nprobe,
                                   hnsw_m=hnsw_m, ef_search=ef_search)
        return sims.to(device), idx.to(device)

    if backend == "auto":
        backend = _auto_backend(index, queries, k_search)
    if backend == "auto_cpu":
        sims, idx = search.auto_exact_cpu_search(bank, queries, k_search, chunk_size)
    elif backend == "torch":
        sims, idx = search.torch_search(bank.to(device), queries.to(device), k_search, chunk_size)
    elif backend == "faiss_heap" or (backend == "faiss" and index == "flat" and device.type != "cuda"):
        sims, idx = search.exact_cpu_search(backend, bank, queries, k_search, chunk_size)
    else:
        sims, idx = search.faiss_search(bank, queries, k_search, index, nlist, nprobe, hnsw_m, ef_search, device,
                                        chunk_size)
    if exclude_self:
        sims, idx = _drop_self(sims, idx, k_out)
    return sims.to(device), idx.to(device)


def _prepare(bank: Any, queries: Any, bank_chunk: int | None) -> tuple[bool, Any, Any]:
    """(search in bank chunks?, bank, queries): normalised tensors in memory; for a chunked search tensors or
    on-disk FeatureArrays, normalised chunk by chunk later."""
    from reprlab.evaluate.cache import FeatureArray

    chunked = isinstance(bank, FeatureArray) or isinstance(queries, FeatureArray) or (
        bank_chunk is not None and bank_chunk < bank.shape[0])
    if not chunked:
        return False, normalize_features(bank), normalize_features(queries)
    bank, queries = (x if isinstance(x, (Tensor, FeatureArray)) else as_tensor(x) for x in (bank, queries))
    return True, bank, queries


def _search_sizes(bank_shape: tuple[int, ...], query_shape: tuple[int, ...], k: int,
                  exclude_self: bool) -> tuple[int, int]:
    """(k', the neighbours searched): k' = min(k, N), or min(k, N - 1) plus self under leave-one-out."""
    if len(bank_shape) != 2 or len(query_shape) != 2:
        raise ValueError(f"features must be 2-D (N, D), got shapes {bank_shape} and {query_shape}; flatten or "
                         f"pool them first")
    if bank_shape[1] != query_shape[1]:
        raise ValueError(f"bank has dim {bank_shape[1]} but queries have dim {query_shape[1]}")
    num_bank = bank_shape[0]
    if exclude_self and query_shape[0] != num_bank:
        raise ValueError(f"exclude_self=True needs the queries to be the bank, got {query_shape[0]} queries for "
                         f"{num_bank} bank items; pass exclude_self=False for a separate query set")
    k_out = min(k, num_bank - 1) if exclude_self else min(k, num_bank)
    return k_out, k_out + 1 if exclude_self else k_out  # k_out + 1 <= N: self is dropped afterwards


def _auto_backend(index: str, queries: Tensor, k: int) -> str:
    if index != "flat":
        return "faiss"
    if queries.is_cuda:
        return "faiss" if search.faiss_gpu_usable(queries, k) else "torch"
    return "auto_cpu"


def _drop_self(sims: Tensor, idx: Tensor, k_out: int) -> tuple[Tensor, Tensor]:
    """Remove each query's own index from its k_out + 1 neighbours (the last one if self was not found)."""
    num_queries = idx.shape[0]
    own_index = torch.arange(num_queries, device=idx.device)[:, None]  # (Q, 1)
    is_self = idx == own_index  # (Q, k_out + 1), at most one True per row
    # Exact duplicates can push self out of the list: then drop the farthest neighbour instead.
    is_self[~is_self.any(dim=1), -1] = True
    keep = ~is_self
    return sims[keep].view(num_queries, k_out), idx[keep].view(num_queries, k_out)


def measure_recall(
    bank: Tensor | np.ndarray,
    queries: Tensor | np.ndarray,
    k: int,
    index: str = "ivf",
    **index_options: Any,
) -> float:
    """Recall@k of an approximate faiss index against exact flat search: mean fraction of the exact top-k
    neighbours that the approximate index also returns (1.0 = identical neighbour sets)."""
    if index == "flat":
        raise ValueError("index='flat' is exact; measure the recall of 'ivf' or 'hnsw'")
    _, exact = knn_search(bank, queries, k, backend="faiss", index="flat")
    _, approx = knn_search(bank, queries, k, backend="faiss", index=index, **index_options)
    if exact.numel() == 0:
        raise ValueError("no queries to measure recall on")
    found = (approx[:, :, None] == exact[:, None, :]).any(dim=1)  # (Q, k'): exact neighbour was found
    return float(found.float().mean())


# ---------------------------------------------------------------------------------------------- classify


@dataclass
class KNNResult:
    """Class scores of a weighted kNN vote.

    scores: (Q, C) vote mass per class; classes: (C,) sorted unique bank labels, column c of ``scores`` is
    label ``classes[c]``.
    """

    scores: Tensor
    classes: Tensor

    @property
    def predictions(self) -> Tensor:
        """(Q,) predicted labels in the original label values (ties -> smallest label)."""
        return self.classes[self.scores.argmax(dim=1)]

    def topk(self, labels: Tensor | np.ndarray, k: int = 1) -> float:
        """Top-k accuracy against ``labels`` (original values).

        Classes are ranked by score, ties by smaller label (as ``predictions``), so k is effectively capped at
        the number of classes. A class that received no vote is never counted as predicted: with k neighbours
        < 5, top-5 cannot be won by an arbitrary zero-score class. A label absent from the bank is wrong.
        """
        labels = as_tensor(labels).long().to(self.classes.device)
        if labels.shape[0] != self.scores.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {self.scores.shape[0]} queries")
        if labels.numel() == 0:
            raise ValueError("no queries: accuracy is undefined")
        position = torch.searchsorted(self.classes, labels).clamp(max=self.classes.numel() - 1)  # (Q,)
        known = self.classes[position] == labels
        label_score = self.scores.gather(1, position[:, None])  # (Q, 1)
        column = torch.arange(self.classes.numel(), device=labels.device)
        ahead = (self.scores > label_score) | ((self.scores == label_score) & (column < position[:, None]))
        rank = ahead.sum(dim=1)  # (Q,) 0 = top-1
        correct = known & (label_score[:, 0] > 0) & (rank < k)
        return float(correct.float().mean())


def bank_classes(bank_labels: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """(classes (C,) sorted unique labels, class index (N,) of each bank item)."""
    bank_labels = as_tensor(bank_labels).long()
    classes, class_index = torch.unique(bank_labels, sorted=True, return_inverse=True)
    return classes, class_index


def vote(sims: Tensor, idx: Tensor, bank_class_index: Tensor, num_classes: int, temperature: float) -> Tensor:
    """(Q, C) float64 class scores: sum of exp(sim / temperature) over each class's neighbours.

    float64 so that small temperatures (exp(1 / 0.01) overflows float32) keep the exact DINO scores.
    Neighbours with index -1 (approximate-index padding) get weight 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = idx >= 0
    neighbour_class = bank_class_index.to(idx.device)[idx.clamp(min=0)]  # (Q, k)
    weights = (sims.double() / temperature).exp() * valid  # (Q, k)
    scores = torch.zeros(idx.shape[0], num_classes, dtype=torch.float64, device=idx.device)
    return scores.scatter_add_(1, neighbour_class, weights)


def knn_classify(
    bank: Tensor | np.ndarray,
    bank_labels: Tensor | np.ndarray,
    queries: Tensor | np.ndarray,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    backend: str = "auto",
    exclude_self: bool = False,
    index: str = "flat",
    **search_options: Any,
) -> KNNResult:
    """Weighted kNN classifier (Wu et al., 2018; DINO): votes weighted by exp(cosine / temperature).

    Classes are the sorted unique ``bank_labels``; ``k`` larger than the bank uses the whole bank.
    ``exclude_self`` gives leave-one-out accuracy when the queries are the bank.
    """
    bank_labels = as_tensor(bank_labels).long()
    if bank_labels.shape[0] != bank.shape[0]:
        raise ValueError(f"{bank_labels.shape[0]} bank labels for {bank.shape[0]} bank items")
    classes, class_index = bank_classes(bank_labels)
    sims, idx = knn_search(bank, queries, k, backend, index, exclude_self, **search_options)
    scores = vote(sims, idx, class_index, classes.numel(), temperature)
    return KNNResult(scores=scores, classes=classes.to(scores.device))


def select_knn(
    bank: Tensor | np.ndarray,
    bank_labels: Tensor | np.ndarray,
    val: Tensor | np.ndarray,
    val_labels: Tensor | np.ndarray,
    ks: tuple[int, ...] = (10, 20, 50, 100, 200),
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.07, 0.1, 0.2, 0.5),
    default_k: int = DEFAULT_K,
    default_temperature: float = DEFAULT_TEMPERATURE,
    backend: str = "auto",
    index: str = "flat",
    **search_options: Any,
) -> dict[str, Any]:
    """Choose k and temperature on a **validation** split (never the test split).

    Searches once with max(ks) and scores every (k, temperature) from prefixes of the same sorted neighbour
    list. Best val top-1 wins; among ties, the (k, temperature) closest to the defaults (the sum of
    |log(k / default_k)| and |log(temperature / default_temperature)|), then the smaller k, then grid order.
    Returns ``dict(k, temperature, val_top1, grid=[dict(k, temperature, val_top1), ...])``.
    """
    if not ks or not temperatures:
        raise ValueError("ks and temperatures must be non-empty")
    if min(ks) < 1:  # k = 0 would score 0 and has no distance to the defaults
        raise ValueError(f"every k must be >= 1, got ks={list(ks)}")
    bank_labels = as_tensor(bank_labels).long()
    classes, class_index = bank_classes(bank_labels)
    sims, idx = knn_search(bank, val, max(ks), backend, index, **search_options)  # (V, k_max)
    grid = []
    for k in ks:
        for temperature in temperatures:
            scores = vote(sims[:, :k], idx[:, :k], class_index, classes.numel(), temperature)
            result = KNNResult(scores=scores, classes=classes.to(scores.device))
            grid.append({"k": k, "temperature": temperature, "val_top1": result.topk(val_labels, k=1)})
    # Ratios, not differences: k = 10 and 40 are equally far from 20, as are T = 0.05 and 0.2 from 0.1.
    best = max(grid, key=lambda row: (row["val_top1"], -abs(math.log(row["k"] / default_k))
                                      - abs(math.log(row["temperature"] / default_temperature)), -row["k"]))
    return {**best, "grid": grid}
