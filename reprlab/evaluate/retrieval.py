"""Label-based retrieval metrics on cached features (cosine similarity, exact search).

Definitions (Musgrave et al., 2020, "A Metric Learning Reality Check"), for a query with label y, ranked bank
items by decreasing cosine similarity, and R = number of bank items labelled y (minus the query itself under
leave-one-out):
- ``precision@k``: fraction of the top k that are labelled y (divided by k' = min(k, bank size));
- ``recall@k``: 1 if at least one of the top k is labelled y, else 0 (the metric-learning "Recall@K", NOT the
  fraction of the R relevant items that were retrieved);
- ``r_precision``: fraction of the top R that are labelled y;
- ``map@r``: (1 / R) * sum over positions i <= R that are labelled y of precision@i.
All are averaged over queries. ``map@r`` and ``r_precision`` are averaged over the queries with R > 0 only
(they are undefined otherwise); ``queries_without_relevant`` counts the others.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from reprlab.data.progress import bar as progress_bar
from reprlab.evaluate.knn import as_tensor, knn_search

# Queries per retrieval_metrics call in chunked_retrieval: memory is chunk x (the largest class in the bank).
RETRIEVAL_QUERY_CHUNK = 2000

def retrieval_metrics(
    bank: Tensor | np.ndarray,
    bank_labels: Tensor | np.ndarray,
    queries: Tensor | np.ndarray,
    query_labels: Tensor | np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    exclude_self: bool = False,
    backend: str = "auto",
    **search_options: Any,
) -> dict[str, Any]:
    """Precision@k, Recall@k, mAP@R and R-precision of ``queries`` against ``bank`` (definitions above).

    ``exclude_self=True`` is leave-one-out when the queries are the bank: the query is removed from both its
    ranking and its relevant count R. The search retrieves max(R) neighbours per query (memory Q x max R).
    """
    bank_labels = as_tensor(bank_labels).long().cpu()
    query_labels = as_tensor(query_labels).long().cpu()
    if bank_labels.shape[0] != bank.shape[0] or query_labels.shape[0] != queries.shape[0]:
        raise ValueError(
            f"labels do not match features: {bank_labels.shape[0]} bank labels for {bank.shape[0]} items, "
            f"{query_labels.shape[0]} query labels for {queries.shape[0]} queries"
        )
    if query_labels.numel() == 0:
        raise ValueError("no queries: retrieval metrics are undefined")
    relevant_counts = _relevant_counts(bank_labels, query_labels, exclude_self)  # (Q,) R per query
    depth = max(max(ks), int(relevant_counts.max()), 1)
    _, idx = knn_search(bank, queries, depth, backend=backend, exclude_self=exclude_self, **search_options)
    idx = idx.cpu()
    # Exact search never pads with -1; the clamp only guards the gather.
    hits = (bank_labels[idx.clamp(min=0)] == query_labels[:, None]) & (idx >= 0)  # (Q, depth')
    hits = hits.double()

    metrics: dict[str, Any] = {}
    for k in ks:
        top = hits[:, :k]
        metrics[f"precision@{k}"] = float(top.mean(dim=1).mean()) if top.shape[1] else 0.0
        metrics[f"recall@{k}"] = float((top.sum(dim=1) > 0).double().mean())
    metrics.update(_map_at_r(hits, relevant_counts))
    return metrics


def _relevant_counts(bank_labels: Tensor, query_labels: Tensor, exclude_self: bool) -> Tensor:
    """(Q,) number of bank items sharing each query's label (self excluded under leave-one-out)."""
    classes, counts = torch.unique(bank_labels, return_counts=True)
    position = torch.searchsorted(classes, query_labels).clamp(max=classes.numel() - 1)
    counts = torch.where(classes[position] == query_labels, counts[position], torch.zeros_like(position))
    return counts - 1 if exclude_self else counts


def _map_at_r(hits: Tensor, relevant_counts: Tensor) -> dict[str, Any]:
    """mAP@R and R-precision from (Q, depth) float hits sorted by rank, depth >= max R."""
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)  # (depth,)
    within_r = ranks[None, :] <= relevant_counts[:, None]  # (Q, depth)
    hits_r = hits * within_r
    precision_at_i = hits_r.cumsum(dim=1) / ranks  # (Q, depth)
    has_relevant = relevant_counts > 0
    num_relevant = relevant_counts.clamp(min=1).double()
    average_precision = (precision_at_i * hits_r).sum(dim=1) / num_relevant  # (Q,)
    r_precision = hits_r.sum(dim=1) / num_relevant  # (Q,)
    defined = int(has_relevant.sum())
    return {
        "map@r": float(average_precision[has_relevant].mean()) if defined else float("nan"),
        "r_precision": float(r_precision[has_relevant].mean()) if defined else float("nan"),
        "queries_without_relevant": int((~has_relevant).sum()),
    }


def _weighted_mean(parts: list[tuple[float, int]]) -> float:
    total = sum(weight for _, weight in parts)
    return sum(value * weight for value, weight in parts if weight) / total if total else float("nan")


def chunked_retrieval(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    backend: str = "auto",
    chunk: int = RETRIEVAL_QUERY_CHUNK,
    progress: bool = False,
) -> dict[str, Any]:
    """``retrieval_metrics`` over chunks of ``chunk`` queries, averaged as one call would (memory chunk x max R
    instead of Q x max R); ``progress``: a bar per chunk (on a terminal)."""
    parts = []
    with progress_bar(len(query_labels), "retrieval", progress, unit="query") as bar:
        for start in range(0, len(query_labels), chunk):
            stop = start + chunk
            metrics = retrieval_metrics(bank, bank_labels, queries[start:stop], query_labels[start:stop], ks=ks,
                                        backend=backend)
            parts.append((metrics, len(query_labels[start:stop])))
            bar.update(len(query_labels[start:stop]))
    combined: dict[str, Any] = {}
    for key in parts[0][0]:
        if key == "queries_without_relevant":
            combined[key] = sum(m[key] for m, _ in parts)
        elif key in ("map@r", "r_precision"):  # averaged over the queries that have a relevant bank item
            combined[key] = _weighted_mean([(m[key], n - m["queries_without_relevant"]) for m, n in parts])
        else:
            combined[key] = _weighted_mean([(m[key], n) for m, n in parts])
    return combined


def retrieval_queries(labels: Tensor, num_queries: int, seed: int) -> Tensor:
    """(num_queries,) seeded indices of queries to show (the report's retrieval grid): one per class while
    classes last, then the next images; the same for every encoder."""
    generator = torch.Generator().manual_seed(seed + 1)
    order = torch.randperm(len(labels), generator=generator)
    chosen, seen = [], set()
    for index in order.tolist():
        if int(labels[index]) not in seen:
            chosen.append(index)
            seen.add(int(labels[index]))
        if len(chosen) == num_queries:
            break
    for index in order.tolist():  # fewer classes than queries: fill with the next images
        if len(chosen) == min(num_queries, len(labels)):
            break
        if index not in chosen:
            chosen.append(index)
    return torch.tensor(chosen, dtype=torch.long)
