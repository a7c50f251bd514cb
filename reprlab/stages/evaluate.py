"""Evaluation stage: several encoders on one dataset -> kNN, retrieval, linear probes, label-free
quality -> ``metrics.json``, one comparison table and a report with pictures.

Every hyperparameter (kNN k and temperature, the probes' regularisation) is chosen on the validation split;
the test split is read once per encoder, with the chosen settings. Without a test split the numbers are
reported on val and nothing is selected (the configured defaults are used), so a reported number is never a
selected one.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reprlab import distributed
from reprlab.checkpoint import CheckpointError, load_encoder, read_meta, write_json
from reprlab.config import EncoderConfig, EvaluateConfig, KNNConfig, save_config, to_dict
from reprlab.data.augment import SimCLRAugment
from reprlab.data.datasets import ImageSet
from reprlab.evaluate.features import cache_key, cached_features, extract_features
from reprlab.evaluate.knn import BACKENDS, INDEXES, knn_classify, knn_search, select_knn
from reprlab.evaluate.linear_probe import sklearn_linear_probe, train_linear_probe
from reprlab.evaluate.quality import alignment, quality_report
from reprlab.evaluate.report import MAP_METHODS
from reprlab.evaluate.retrieval import retrieval_metrics
from reprlab.models.encoders import PixelEncoder, encoder_from_spec
from reprlab.stages.common import build_dataset, build_encoder

KEYWORDS = ("random", "pixels")
# Queries per retrieval_metrics call: memory is chunk x (the largest class in the bank).
RETRIEVAL_QUERY_CHUNK = 2000
# SimCLR views used for alignment when no SimCLR run dir says otherwise (CIFAR-scale: no blur).
DEFAULT_VIEW_AUGMENT = dict(crop_scale=(0.2, 1.0), flip_p=0.5, jitter_strength=0.5, jitter_p=0.8,
                            grayscale_p=0.2, blur_p=0.0)


@dataclass
class ResolvedEncoder:
    """An encoder to evaluate: ``label`` for tables, ``identity`` for the feature cache key, ``run_dir`` when
    it comes from a pretraining run (training curves and reconstructions are read from there)."""

    label: str
    encoder: nn.Module
    identity: str
    source: str
    run_dir: Path | None = None


@dataclass
class Split:
    """Cached features (N, D) float32 and labels (N,) of one split."""

    features: Tensor
    labels: Tensor


@dataclass
class EncoderEvaluation:
    """``metrics`` (JSON-ready) and the kNN predictions on the reported split (for the confusion matrix)."""

    metrics: dict[str, Any]
    knn_predictions: Tensor
    extras: dict[str, Any] = field(default_factory=dict)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _unique_label(label: str, taken: set[str]) -> str:
    candidate, n = label, 2
    while candidate in taken:
        candidate, n = f"{label} ({n})", n + 1
    return candidate


def resolve_encoders(refs: list[str], arch: EncoderConfig, seed: int = 0) -> list[ResolvedEncoder]:
    """Run directories, ``random`` (the architecture of the first run directory in ``refs``, else ``arch``,
    untrained, seeded) and ``pixels`` (raw pixels), in the order given."""
    if not refs:
        raise ValueError("no encoders to evaluate: set encoders=[runs/<name>, random, pixels]")
    run_dirs = [r for r in refs if r not in KEYWORDS]
    resolved: list[ResolvedEncoder] = []
    taken: set[str] = set()
    for ref in refs:
        if ref == "pixels":
            item = ResolvedEncoder("pixels", PixelEncoder(), "pixels", "pixels")
        elif ref == "random":
            torch.manual_seed(seed)
            if run_dirs:
                spec = read_meta(run_dirs[0])["encoder"]
                encoder = encoder_from_spec(spec)  # the run's architecture and image embedding
                identity = f"random:{spec}:{seed}"
            else:  # arch may carry pretrained weights: then this is a "pretrained elsewhere" baseline
                spec = {"name": arch.name, "kwargs": arch.kwargs}
                encoder = build_encoder(arch)
                identity = f"random:{spec}:{arch.pretrained}:{arch.weights}:{seed}"
            pretrained = not run_dirs and (arch.pretrained or arch.weights)
            label = f"{'pretrained' if pretrained else 'random'} {spec['name']}"
            if spec.get("patch_pooling"):
                label += " (patch-pooled)"
            item = ResolvedEncoder(label, encoder, identity, "random")
        else:
            path = Path(ref)
            if not (path / "encoder.safetensors").is_file():
                raise CheckpointError(f"encoder {ref!r} is not a run directory with encoder.safetensors; "
                                      f"give a pretraining run directory, 'random' or 'pixels'")
            item = ResolvedEncoder(path.name, load_encoder(path), _file_digest(path / "encoder.safetensors"),
                                   str(path), run_dir=path)
        item.label = _unique_label(item.label, taken)
        taken.add(item.label)
        resolved.append(item)
    return resolved


# ------------------------------------------------------------------------------------------- selection


def _closest_to_defaults(grid: list[dict[str, Any]], k: int, temperature: float) -> dict[str, Any]:
    """Best val top-1; among ties the (k, temperature) closest to the configured defaults (sum of the log
    ratios), then the smaller k."""
    return max(grid, key=lambda row: (row["val_top1"], -abs(math.log(row["k"] / k))
                                      - abs(math.log(row["temperature"] / temperature)), -row["k"]))


def choose_knn_settings(bank: Split, val: Split | None, knn: KNNConfig) -> dict[str, Any]:
    """k and temperature for the final kNN: the best of the ``ks`` x ``temperatures`` grid on ``val`` when
    ``knn.select_on_val``, else (or without a val split) the configured ``k`` and ``temperature``."""
    if not (knn.select_on_val and val is not None):
        reason = "select_on_val is false" if not knn.select_on_val else "no validation split"
        return {"k": knn.k, "temperature": knn.temperature, "selected_on": f"defaults ({reason})"}
    chosen = select_knn(bank.features, bank.labels, val.features, val.labels, ks=tuple(knn.ks),
                        temperatures=tuple(knn.temperatures), backend=knn.backend, index=knn.index)
    best = _closest_to_defaults(chosen["grid"], knn.k, knn.temperature)
    return {"k": best["k"], "temperature": best["temperature"], "selected_on": "val",
            "val_top1": best["val_top1"], "grid": chosen["grid"]}


def _weighted_mean(parts: list[tuple[float, int]]) -> float:
    total = sum(weight for _, weight in parts)
    return sum(value * weight for value, weight in parts if weight) / total if total else float("nan")


def chunked_retrieval(bank: Split, queries: Split, ks: tuple[int, ...], backend: str,
                      chunk: int = RETRIEVAL_QUERY_CHUNK) -> dict[str, Any]:
    """``retrieval_metrics`` over query chunks, averaged as one call would (memory: chunk x max R)."""
    parts = []
    for start in range(0, len(queries.labels), chunk):
        stop = start + chunk
        metrics = retrieval_metrics(bank.features, bank.labels, queries.features[start:stop],
                                    queries.labels[start:stop], ks=ks, backend=backend)
        parts.append((metrics, len(queries.labels[start:stop])))
    combined: dict[str, Any] = {}
    for key in parts[0][0]:
        if key == "queries_without_relevant":
            combined[key] = sum(m[key] for m, _ in parts)
        elif key in ("map@r", "r_precision"):  # averaged over the queries that have a relevant bank item
            combined[key] = _weighted_mean([(m[key], n - m["queries_without_relevant"]) for m, n in parts])
        else:
            combined[key] = _weighted_mean([(m[key], n) for m, n in parts])
    return combined


# ------------------------------------------------------------------------------------------- evaluation


def _subset(features: Tensor, limit: int, seed: int) -> Tensor:
    if len(features) <= limit:
        return features
    keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:limit]
    return features[keep.sort().values]


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


def knn_metrics(train: Split, select_val: Split | None, final: Split, knn: KNNConfig) -> tuple[dict, Tensor]:
    """kNN top-1 / top-5 on ``final`` with k and temperature chosen on ``select_val`` (see
    ``choose_knn_settings``), and the kNN predictions (Q,)."""
    chosen = choose_knn_settings(train, select_val, knn)
    result = knn_classify(train.features, train.labels, final.features, k=chosen["k"],
                          temperature=chosen["temperature"], backend=knn.backend, index=knn.index)
    metrics = {"knn_top1": result.topk(final.labels, 1), "knn_top5": result.topk(final.labels, 5),
               "knn_k": chosen["k"], "knn_temperature": chosen["temperature"],
               "knn_selected_on": chosen["selected_on"]}
    if "val_top1" in chosen:
        metrics.update(knn_val_top1=chosen["val_top1"], knn_grid=chosen["grid"])
    return metrics, result.predictions.cpu()


def probe_metrics(train: Split, val: Split, final: Split, cfg: EvaluateConfig, sklearn: bool = False,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Test top-1 of a linear probe whose regularisation was chosen on ``val``: the torch sweep (lr x weight
    decay), or the scikit-learn LogisticRegression cross-check (C)."""
    if sklearn:
        prefix = "sklearn_probe"
        probe = sklearn_linear_probe(train.features, train.labels, val.features, val.labels,
                                     Cs=tuple(cfg.sklearn_cs), max_iter=cfg.sklearn_max_iter)
    else:
        prefix = "linear_probe"
        probe = train_linear_probe(train.features, train.labels, val.features, val.labels,
                                   lrs=tuple(cfg.probe_lrs), weight_decays=tuple(cfg.probe_weight_decays),
                                   epochs=cfg.probe_epochs, batch_size=cfg.probe_batch_size, device=device,
                                   seed=cfg.seed)
    return {f"{prefix}_top1": probe.evaluate(final.features, final.labels),
            f"{prefix}_val_top1": probe.val_top1, f"{prefix}_params": probe.hyperparameters,
            f"{prefix}_grid": probe.grid}


def evaluate_features(train: Split, val: Split | None, test: Split | None, cfg: EvaluateConfig,
                      device: torch.device | str = "cpu") -> EncoderEvaluation:
    """kNN, retrieval, linear probes and label-free quality of cached features.

    Selection (kNN grid, probe sweeps) sees only ``train`` and ``val``; ``test`` is used once by each metric,
    with the chosen settings. Without ``test`` the report is on ``val`` and nothing is selected."""
    final, reported_on = (test, "test") if test is not None else (val, "val")
    if final is None:
        raise ValueError("evaluation needs a labeled test or validation split; set data.val_fraction > 0")
    select_val = val if test is not None else None  # never select on the split that is reported
    timings: dict[str, float] = {}
    metrics: dict[str, Any] = {"reported_on": reported_on, "feature_dim": int(train.features.shape[1])}
    with _timed(timings, "knn_s"):
        knn, predictions = knn_metrics(train, select_val, final, cfg.knn)
        metrics.update(knn)
    if cfg.retrieval_ks:
        with _timed(timings, "retrieval_s"):
            metrics["retrieval"] = chunked_retrieval(train, final, tuple(cfg.retrieval_ks), cfg.knn.backend)
    for enabled, sklearn in ((cfg.linear_probe, False), (cfg.sklearn_probe, True)):
        if enabled and select_val is not None:
            with _timed(timings, "sklearn_probe_s" if sklearn else "linear_probe_s"):
                metrics.update(probe_metrics(train, select_val, final, cfg, sklearn, device))
    if (cfg.linear_probe or cfg.sklearn_probe) and select_val is None:
        metrics["linear_probe_skipped"] = "no validation split to choose the regularisation on"
    with _timed(timings, "quality_s"):
        quality = quality_report(_subset(train.features, cfg.quality_max_features, cfg.seed), seed=cfg.seed)
        metrics.update(quality=quality, effective_rank=quality["effective_rank"],
                       embedding_std=quality["embedding_std"])
    metrics["timings_s"] = timings
    return EncoderEvaluation(metrics=metrics, knn_predictions=predictions)


# ------------------------------------------------------------------------------------------- table


def _percent(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else f"{100 * value:.2f}"


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


TABLE_HEADERS = ["encoder", "kNN top-1", "kNN top-5", "k / T", "probe top-1", "sklearn top-1", "mAP@R",
                 "P@1", "R-prec", "alignment", "uniformity", "eff. rank", "std x sqrt(D)"]


def table_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per encoder, the columns of ``TABLE_HEADERS`` (accuracies in %)."""
    rows = []
    for label, m in results.items():
        retrieval, quality = m.get("retrieval", {}), m.get("quality", {})
        std = quality.get("embedding_std")
        rows.append([
            label, _percent(m, "knn_top1"), _percent(m, "knn_top5"),
            f"{m['knn_k']} / {m['knn_temperature']:g}",
            _percent(m, "linear_probe_top1"), _percent(m, "sklearn_probe_top1"),
            _percent(retrieval, "map@r"), _percent(retrieval, "precision@1"),
            _percent(retrieval, "r_precision"),
            _number(quality.get("alignment")), _number(quality.get("uniformity")),
            _number(quality.get("effective_rank"), 1),
            _number(None if std is None else std * math.sqrt(m["feature_dim"]), 2),
        ])
    return rows


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The comparison table as markdown."""
    lines = ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + " --- |" * len(TABLE_HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- views


def view_augment_params(encoders: list[ResolvedEncoder]) -> dict[str, Any]:
    """SimCLR augmentation for the alignment views: the first SimCLR run's own (digits turn flips off, for
    example), else ``DEFAULT_VIEW_AUGMENT``. One setting for all encoders so their alignments compare."""
    for item in encoders:
        if item.run_dir is None:
            continue
        meta = read_meta(item.run_dir)
        if meta.get("method") == "simclr":
            params = meta.get("config", {}).get("method", {}).get("params", {})
            chosen = {key: params[key] for key in DEFAULT_VIEW_AUGMENT if key in params}
            return {**DEFAULT_VIEW_AUGMENT, **chosen, "from": str(item.run_dir)}
    return {**DEFAULT_VIEW_AUGMENT, "from": "defaults"}


def make_views(images: Tensor, params: dict[str, Any], num_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """Two SimCLR views (float in [0, 1], same size as the input) of a seeded subset of ``images``."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(images), generator=generator)[:num_images].sort().values
    augment = SimCLRAugment(size=images.shape[-1], **{k: v for k, v in params.items() if k != "from"})
    view0, view1 = augment.views(images[keep], n=2, generator=generator)
    return view0, view1


# ------------------------------------------------------------------------------------------- entry point


def _split(data: ImageSet | None) -> ImageSet | None:
    return data if data is not None and data.labels is not None else None


def _features(item: ResolvedEncoder, splits: dict[str, ImageSet | None], cfg: EvaluateConfig,
              cache_dir: Path | None, device: torch.device) -> tuple[dict[str, Split | None], float]:
    start = time.perf_counter()
    feats: dict[str, Split | None] = {}
    for split, images in splits.items():
        if images is None:
            feats[split] = None
            continue
        key = cache_key(encoder=item.identity, dataset=cfg.data.name, split=split, n=len(images),
                        image_size=cfg.data.image_size, limit=cfg.data.limit, seed=cfg.seed,
                        val_fraction=cfg.data.val_fraction)
        features = cached_features(cache_dir, key, lambda im=images: extract_features(
            item.encoder, im.images, cfg.batch_size, device, shard=True))
        feats[split] = Split(features, images.labels)
    return feats, time.perf_counter() - start


def _report_extras(train: Split, final: Split, query_index: Tensor, map_index: Tensor, backend: str,
                   neighbours: int = 8) -> dict[str, Any]:
    """The small per-encoder pieces the report draws: map points and the retrieval grid's neighbours."""
    sims, idx = knn_search(train.features, final.features[query_index], neighbours, backend=backend)
    return {"map_features": final.features[map_index], "neighbours": idx.cpu(), "neighbour_sims": sims.cpu()}


def check_config(cfg: EvaluateConfig) -> None:
    """Fail before any feature is extracted on a setting that would only fail at the end."""
    choices = [("knn.backend", cfg.knn.backend, BACKENDS), ("knn.index", cfg.knn.index, INDEXES),
               ("report_map", cfg.report_map, MAP_METHODS)]
    for key, value, valid in choices:
        if value not in valid:
            raise ValueError(f"unknown {key} {value!r}; choose from {sorted(valid)}")
    if cfg.knn.backend == "torch" and cfg.knn.index != "flat":
        raise ValueError(f"knn.index={cfg.knn.index!r} needs knn.backend=faiss (the torch backend is exact)")
    if cfg.knn.select_on_val and (not cfg.knn.ks or not cfg.knn.temperatures):
        raise ValueError("knn.select_on_val needs non-empty knn.ks and knn.temperatures")


@dataclass
class _Context:
    """What every encoder of one evaluate call shares: data, alignment views, the report's chosen rows."""

    splits: dict[str, ImageSet | None]
    final: ImageSet  # the reported split: test, or val when there is no test split
    views: tuple[Tensor, Tensor] | None
    map_index: Tensor  # (P,) rows of `final` on the 2-D map
    query_index: Tensor  # (R,) rows of `final` in the retrieval grid
    cache_dir: Path | None
    device: torch.device


def _evaluate_encoder(item: ResolvedEncoder, ctx: _Context, cfg: EvaluateConfig) -> EncoderEvaluation | None:
    """Features (cached) and every metric of one encoder; None on the ranks other than 0."""
    feats, features_s = _features(item, ctx.splits, cfg, ctx.cache_dir, ctx.device)
    view_features = None
    if ctx.views is not None:  # every rank extracts: extraction gathers across ranks under DDP
        view_features = [extract_features(item.encoder, view, cfg.batch_size, ctx.device, shard=True)
                         for view in ctx.views]
    if not distributed.is_main():
        return None
    evaluation = evaluate_features(feats["train"], feats["val"], feats["test"], cfg, ctx.device)
    metrics = evaluation.metrics
    if view_features is not None:
        metrics["alignment"] = metrics["quality"]["alignment"] = alignment(*view_features)
    metrics.update(source=item.source, identity=item.identity)
    metrics["timings_s"]["features_s"] = features_s
    final = feats["test"] if feats["test"] is not None else feats["val"]
    evaluation.extras = _report_extras(feats["train"], final, ctx.query_index, ctx.map_index,
                                       cfg.knn.backend)
    probe = ""
    if "linear_probe_top1" in metrics:
        probe = f", linear probe top-1 {100 * metrics['linear_probe_top1']:.2f}%"
    print(f"{item.label}: kNN top-1 {100 * metrics['knn_top1']:.2f}% (k={metrics['knn_k']}, "
          f"T={metrics['knn_temperature']:g}, {metrics['knn_selected_on']}){probe}", flush=True)
    return evaluation


def _write_report(run_dir: Path, summary: dict[str, Any], evaluations: dict[str, EncoderEvaluation],
                  encoders: list[ResolvedEncoder], ctx: _Context, cfg: EvaluateConfig) -> None:
    from reprlab.evaluate.report import EncoderView, ReportData, write_report

    train = ctx.splits["train"]
    views = [EncoderView(label=item.label, run_dir=item.run_dir,
                         knn_predictions=evaluations[item.label].knn_predictions,
                         **evaluations[item.label].extras) for item in encoders]
    report = ReportData(title=f"Evaluation on {cfg.data.name}", summary=summary, headers=TABLE_HEADERS,
                        rows=table_rows(summary["encoders"]), class_names=list(train.classes),
                        train_images=train.images, train_labels=train.labels, test_images=ctx.final.images,
                        test_labels=ctx.final.labels, map_index=ctx.map_index, query_index=ctx.query_index,
                        encoders=views)
    write_report(run_dir, report, map_method=cfg.report_map, seed=cfg.seed)


def evaluate(cfg: EvaluateConfig) -> Path:
    """Evaluate every encoder in ``cfg.encoders``; writes ``metrics.json`` (with the settings used), the
    comparison table and ``report.md`` / ``report.html`` with pictures to ``out_dir/name``."""
    check_config(cfg)
    device = distributed.setup(cfg.device)
    run_dir = Path(cfg.out_dir) / cfg.name
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    data = build_dataset(cfg.data, cfg.seed)
    if data.train.labels is None:
        raise ValueError(f"evaluation needs labels; dataset {cfg.data.name!r} has none")
    splits = {"train": data.train, "val": _split(data.val), "test": _split(data.test)}
    final = splits["test"] if splits["test"] is not None else splits["val"]
    if final is None:
        raise ValueError(f"dataset {cfg.data.name!r} has no labeled test split: set data.val_fraction > 0")
    encoders = resolve_encoders(list(cfg.encoders), cfg.arch, cfg.seed)
    view_params = view_augment_params(encoders)
    view_split = "val" if splits["val"] is not None else "train"
    views = None
    if cfg.quality_images:
        views = make_views(splits[view_split].images, view_params, cfg.quality_images, cfg.seed)
    map_order = torch.randperm(len(final), generator=torch.Generator().manual_seed(cfg.seed))
    ctx = _Context(splits=splits, final=final, views=views, device=device,
                   map_index=map_order[:cfg.report_points].sort().values,
                   query_index=_retrieval_queries(final.labels, 6, cfg.seed),
                   cache_dir=run_dir / "cache" if cfg.cache_features else None)

    evaluations = {item.label: _evaluate_encoder(item, ctx, cfg) for item in encoders}
    if not distributed.is_main():
        return run_dir
    results = {label: evaluation.metrics for label, evaluation in evaluations.items()}
    summary = {
        "dataset": cfg.data.name,
        "reported_on": "test" if splits["test"] is not None else "val",
        "num_images": {split: (0 if images is None else len(images)) for split, images in splits.items()},
        "class_names": list(data.train.classes),
        "alignment_views": {**view_params, "images": 0 if views is None else len(views[0]),
                            "split": view_split},
        "settings": to_dict(cfg),
        "encoders": results,
        "table": format_table(results),
    }
    write_json(run_dir / "metrics.json", summary)
    if cfg.report:
        _write_report(run_dir, summary, evaluations, encoders, ctx, cfg)
    print(summary["table"])
    return run_dir


def _retrieval_queries(labels: Tensor, num_queries: int, seed: int) -> Tensor:
    """Seeded test indices for the retrieval grid, one per class while classes last (the same for every
    encoder)."""
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
