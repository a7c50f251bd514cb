"""Every metric of one encoder from its cached features: features in, metrics out (no files, no run dir).

kNN, retrieval, linear probes and label-free quality. Every hyperparameter (kNN k and temperature, the probes'
regularisation) is chosen on the validation split; the test split is read once per metric, with the chosen
settings. Without a test split the numbers are reported on val and nothing is selected (the configured
defaults are used), so a reported number is never a selected one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reprlab.config import EvaluateConfig, KNNConfig
from reprlab.evaluate.bank import measure_recall
from reprlab.evaluate.cache import FeatureArray
from reprlab.evaluate.knn import knn_classify, select_knn
from reprlab.evaluate.linear_probe import sklearn_linear_probe, train_linear_probe
from reprlab.evaluate.quality import quality_report
from reprlab.evaluate.retrieval import chunked_retrieval


@dataclass
class Split:
    """Cached features (N, D) float32, in memory or an on-disk :class:`FeatureArray` (read in chunks by every
    metric), and labels (N,) of one split."""

    features: Tensor | FeatureArray
    labels: Tensor


@dataclass
class EncoderEvaluation:
    """``metrics`` (JSON-ready), the kNN predictions (Q,) on the reported split (for the confusion matrix) and
    the small pieces the report draws (``extras``, filled by the caller)."""

    metrics: dict[str, Any]
    knn_predictions: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


def choose_knn_settings(bank: Split, val: Split | None, knn: KNNConfig, progress: bool = False) -> dict[str, Any]:
    """k and temperature for the final kNN: the best of the ``ks`` x ``temperatures`` grid on ``val`` when
    ``knn.select_on_val`` (ties: closest to ``knn.k`` / ``knn.temperature``, see ``select_knn``), else (or
    without a val split) the configured ``k`` and ``temperature``."""
    if not (knn.select_on_val and val is not None):
        reason = "select_on_val is false" if not knn.select_on_val else "no validation split"
        return {"k": knn.k, "temperature": knn.temperature, "selected_on": f"defaults ({reason})"}
    best = select_knn(bank.features, bank.labels, val.features, val.labels, ks=tuple(knn.ks),
                      temperatures=tuple(knn.temperatures), default_k=knn.k, default_temperature=knn.temperature,
                      backend=knn.backend, index=knn.index, progress=progress)
    return {"k": best["k"], "temperature": best["temperature"], "selected_on": "val",
            "val_top1": best["val_top1"], "grid": best["grid"]}


def knn_metrics(train: Split, select_val: Split | None, final: Split, knn: KNNConfig, progress: bool = False,
                seed: int = 0) -> tuple[dict, Tensor]:
    """kNN top-1 / top-5 on ``final`` with k and temperature chosen on ``select_val`` (see
    ``choose_knn_settings``), and the kNN predictions (Q,). An approximate index (``knn.index`` ivf / hnsw)
    adds ``knn_recall``: its recall@k against exact search on ``knn.recall_queries`` seeded ``final`` queries."""
    chosen = choose_knn_settings(train, select_val, knn, progress)
    result = knn_classify(train.features, train.labels, final.features, k=chosen["k"],
                          temperature=chosen["temperature"], backend=knn.backend, index=knn.index,
                          progress=progress)
    metrics = {"knn_top1": result.topk(final.labels, 1), "knn_top5": result.topk(final.labels, 5),
               "knn_k": chosen["k"], "knn_temperature": chosen["temperature"],
               "knn_selected_on": chosen["selected_on"]}
    if "val_top1" in chosen:
        metrics.update(knn_val_top1=chosen["val_top1"], knn_grid=chosen["grid"])
    if knn.index != "flat" and knn.recall_queries:
        metrics["knn_recall"] = {**measure_recall(train.features, final.features, chosen["k"], knn.index,
                                                  sample=knn.recall_queries, seed=seed),
                                 "against": "exact search", "split": "reported"}
    return metrics, result.predictions.cpu()


def probe_metrics(train: Split, val: Split, final: Split, cfg: EvaluateConfig, sklearn: bool = False,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Top-1 on ``final`` of a linear probe whose regularisation was chosen on ``val``: the torch sweep (lr x
    weight decay, in mini-batches read from the disk for features that stay there), or the scikit-learn
    LogisticRegression cross-check (C; skipped for such features: it needs them in memory)."""
    if sklearn and any(isinstance(s.features, FeatureArray) for s in (train, val, final)):
        return {"sklearn_probe_skipped": "the features stay on disk (larger than data.memory_limit_gb) and "
                                         "scikit-learn needs them in memory; the torch probe ran in mini-batches"}
    if sklearn:
        prefix = "sklearn_probe"
        probe = sklearn_linear_probe(train.features, train.labels, val.features, val.labels,
                                     Cs=tuple(cfg.sklearn_cs), max_iter=cfg.sklearn_max_iter)
    else:
        prefix = "linear_probe"
        probe = train_linear_probe(train.features, train.labels, val.features, val.labels,
                                   lrs=tuple(cfg.probe_lrs), weight_decays=tuple(cfg.probe_weight_decays),
                                   epochs=cfg.probe_epochs, batch_size=cfg.probe_batch_size, device=device,
                                   seed=cfg.seed, progress=cfg.progress)
    return {f"{prefix}_top1": probe.evaluate(final.features, final.labels),
            f"{prefix}_val_top1": probe.val_top1, f"{prefix}_params": probe.hyperparameters,
            f"{prefix}_grid": probe.grid}


def _subset(features: Tensor | FeatureArray, limit: int, seed: int) -> Tensor:
    if len(features) <= limit:
        return features.load() if isinstance(features, FeatureArray) else features
    keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:limit]
    return features[keep.sort().values]


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def evaluate_features(train: Split, val: Split | None, test: Split | None, cfg: EvaluateConfig,
                      device: torch.device | str = "cpu", unlabeled: Tensor | None = None) -> EncoderEvaluation:
    """kNN, retrieval, linear probes and label-free quality of cached features (the quality of ``unlabeled``
    train features when given: a few-label evaluation's ``train`` is only its labeled subset).

    Selection (kNN grid, probe sweeps) sees only ``train`` and ``val``; ``test`` is used once by each metric,
    with the chosen settings. Without ``test`` the report is on ``val`` and nothing is selected."""
    final, reported_on = (test, "test") if test is not None else (val, "val")
    if final is None:
        raise ValueError("evaluation needs a labeled test or validation split; set data.val_fraction > 0")
    select_val = val if test is not None else None  # never select on the split that is reported
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {"reported_on": reported_on, "feature_dim": int(train.features.shape[1])}
    with _timed(timings, "knn_s"):
        knn, predictions = knn_metrics(train, select_val, final, cfg.knn, cfg.progress, cfg.seed)
        metrics.update(knn)
    if cfg.retrieval_ks:
        with _timed(timings, "retrieval_s"):
            metrics["retrieval"] = chunked_retrieval(train.features, train.labels, final.features, final.labels,
                                                     ks=tuple(cfg.retrieval_ks), backend=cfg.knn.backend,
                                                     progress=cfg.progress)
    for enabled, sklearn in ((cfg.linear_probe, False), (cfg.sklearn_probe, True)):
        if enabled and select_val is not None:
            with _timed(timings, "sklearn_probe_s" if sklearn else "linear_probe_s"):
                metrics.update(probe_metrics(train, select_val, final, cfg, sklearn, device))
    if (cfg.linear_probe or cfg.sklearn_probe) and select_val is None:
        metrics["linear_probe_skipped"] = "no validation split to choose the regularisation on"
    with _timed(timings, "quality_s"):
        pool = train.features if unlabeled is None else unlabeled
        quality = quality_report(_subset(pool, cfg.quality_max_features, cfg.seed), seed=cfg.seed)
        metrics.update(quality=quality, effective_rank=quality["effective_rank"],
                       embedding_std=quality["embedding_std"])
    metrics["timings_s"] = timings
    return EncoderEvaluation(metrics=metrics, knn_predictions=predictions)
