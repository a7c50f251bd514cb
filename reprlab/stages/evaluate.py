"""Evaluation stage: several encoders on one dataset -> kNN, retrieval, linear probes, label-free
quality -> ``metrics.json``, one comparison table and a report with pictures.

Orchestration only: resolve the encoders, extract (and cache) their features, hand them to
``reprlab.evaluate.suite.evaluate_features`` (where every hyperparameter is chosen on val and test is read
once), then write ``metrics.json`` and the report. A streamed dataset's features go batch by batch into an
on-disk cache (``reprlab.evaluate.cache``), read back into memory when they fit in ``data.memory_limit_gb`` and
otherwise left there, where every metric reads them in chunks.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reprlab import distributed, rundir
from reprlab.checkpoint import CheckpointError, load_encoder, read_meta, write_json
from reprlab.checks import check_evaluate, choose, number
from reprlab.config import EncoderConfig, EvaluateConfig, to_dict
from reprlab.data.datasets import ImageSet, per_class_subset
from reprlab.data.files import FileSet
from reprlab.data.views import ViewAugment
from reprlab.evaluate.cache import CACHE_DTYPES, FeatureArray, FeatureCache, auto_chunk_rows, dataset_fingerprint
from reprlab.evaluate.features import cache_key, cached_features, extract_features
from reprlab.evaluate.knn import knn_search
from reprlab.evaluate.quality import alignment
from reprlab.evaluate.retrieval import retrieval_queries
from reprlab.evaluate.suite import EncoderEvaluation, Split, evaluate_features
from reprlab.evaluate.tables import TABLE_HEADERS, format_table, table_rows
from reprlab.hardware import native_bf16
from reprlab.models.encoders import PixelEncoder, encoder_from_spec
from reprlab.stages.common import build_dataset, build_encoder, check_classes, check_labels_per_class

KEYWORDS = ("random", "pixels")


@dataclass
class ResolvedEncoder:
    """An encoder to evaluate: ``label`` for tables, ``identity`` for the feature cache key, ``run_dir`` when
    it comes from a pretraining run (training curves and reconstructions are read from there)."""

    label: str
    encoder: nn.Module
    identity: str
    source: str
    run_dir: Path | None = None


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


# ------------------------------------------------------------------------------------------- views


def alignment_views(images: Tensor, augment: ViewAugment, num_images: int, seed: int) -> tuple[Tensor, Tensor]:
    """Two views by ``augment`` (``cfg.alignment_views``: one setting for every encoder, so their alignments
    compare) of a seeded subset of ``images``, float in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(images), generator=generator)[:num_images].sort().values
    view0, view1 = augment.views(images[keep], n=2, generator=generator)
    return view0, view1


# ------------------------------------------------------------------------------------------- entry point


def _split(data: ImageSet | None) -> ImageSet | None:
    return data if data is not None and data.labels is not None else None


def _encoder_fingerprint(item: ResolvedEncoder, device: torch.device) -> dict[str, Any]:
    """What determines an encoder's features: its identity (the weights file's digest for a run directory),
    its spec (pooling) and the precision of the extraction."""
    spec = read_meta(item.run_dir).get("encoder") if item.run_dir is not None else None
    return {"encoder": item.identity, "spec": spec, "precision": "bf16" if native_bf16(device) else "fp32"}


def _in_memory_features(item: ResolvedEncoder, split: str, images: ImageSet, ctx: _Context,
                        cfg: EvaluateConfig) -> Tensor:
    key = cache_key(encoder=item.identity, dataset=cfg.data.name, split=split, n=len(images),
                    image_size=cfg.data.image_size, limit=cfg.data.limit, seed=cfg.seed,
                    val_fraction=cfg.data.val_fraction,
                    **({"test_fraction": cfg.data.test_fraction} if cfg.data.test_fraction else {}))
    return cached_features(ctx.cache_dir, key, lambda: extract_features(
        item.encoder, images.images, cfg.batch_size, ctx.device, shard=True,
        progress=cfg.progress and distributed.is_main(), desc=f"{item.label}: {split} features"))


def _features(item: ResolvedEncoder, ctx: _Context, cfg: EvaluateConfig) -> tuple[dict[str, Split | None], float]:
    """Every split's features: decoded splits in memory (cached as safetensors), streamed ones through the
    on-disk cache (``Split.features`` is None there on the ranks other than 0)."""
    start = time.perf_counter()
    feats: dict[str, Split | None] = {}
    reused: dict[str, bool] = {}
    for split, images in ctx.splits.items():
        if images is None:
            feats[split] = None
        elif isinstance(images, FileSet):  # streamed: batch by batch into the on-disk cache
            fingerprint = {"encoder": _encoder_fingerprint(item, ctx.device), "dataset": dataset_fingerprint(
                images, split, cfg.data.name, limit=cfg.data.limit, seed=cfg.seed,
                val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction)}
            array, reused[split] = ctx.feature_cache.features(item.encoder, images, fingerprint, cfg.batch_size,
                                                              ctx.device, desc=f"{item.label}: {split} features")
            feats[split] = Split(array, images.labels)
        else:
            feats[split] = Split(_in_memory_features(item, split, images, ctx, cfg), images.labels)
    if reused and distributed.is_main():
        _place_features(item.label, feats, reused, ctx.feature_cache, cfg)
    return feats, time.perf_counter() - start


def _place_features(label: str, feats: dict[str, Split | None], reused: dict[str, bool], cache: FeatureCache,
                    cfg: EvaluateConfig) -> None:
    """On-disk features read into memory when all of them fit in ``data.memory_limit_gb`` (as float32), else
    left on disk and read ``feature_chunk_rows`` rows at a time; says which, and what the cache held, in a line."""
    arrays = {split: feats[split].features for split in reused}
    size_gb = sum(a.float32_bytes for a in arrays.values()) / 1e9
    limit = cfg.data.memory_limit_gb
    rows = cfg.feature_chunk_rows or auto_chunk_rows(limit, next(iter(arrays.values())).shape[1])
    if size_gb <= limit:
        for split in arrays:
            feats[split].features = arrays[split].load()
        placed = f"{size_gb:.2f} GB as float32 <= data.memory_limit_gb={limit:g}: read into memory"
    else:
        for array in arrays.values():
            array.chunk_rows = rows
        placed = (f"{size_gb:.2f} GB as float32 > data.memory_limit_gb={limit:g}: kept on disk, read {rows} rows "
                  f"at a time")
    hits = [s for s, hit in reused.items() if hit]
    misses = [s for s, hit in reused.items() if not hit]
    state = "; ".join(part for part in (f"reused from the cache: {', '.join(hits)}" if hits else "",
                                        f"computed: {', '.join(misses)}" if misses else "") if part)
    print(f"{label}: {cfg.feature_cache_dtype} features in {cache.directory} ({state}); {placed}", flush=True)


def _report_extras(train: Split, final: Split, query_index: Tensor, map_index: Tensor, backend: str,
                   neighbours: int = 8) -> dict[str, Any]:
    """The small per-encoder pieces the report draws: map points and the retrieval grid's neighbours."""
    sims, idx = knn_search(train.features, final.features[query_index], neighbours, backend=backend)
    return {"map_features": final.features[map_index], "neighbours": idx.cpu(), "neighbour_sims": sims.cpu()}


@dataclass
class _Context:
    """What every encoder of one evaluate call shares: data, alignment views, the report's chosen rows."""

    splits: dict[str, ImageSet | None]
    final: ImageSet  # the reported split: test, or val when there is no test split
    views: tuple[Tensor, Tensor] | None
    map_index: Tensor  # (P,) rows of `final` on the 2-D map
    query_index: Tensor  # (R,) rows of `final` in the retrieval grid
    cache_dir: Path | None  # decoded splits' features (safetensors); None: not cached
    feature_cache: FeatureCache  # streamed splits' features (.npy read in chunks)
    device: torch.device
    labeled_index: Tensor | None = None  # (L,) train rows whose labels are used (labels_per_class), None: all


def _evaluate_encoder(item: ResolvedEncoder, ctx: _Context, cfg: EvaluateConfig) -> EncoderEvaluation | None:
    """Features (cached) and every metric of one encoder; None on the ranks other than 0."""
    feats, features_s = _features(item, ctx, cfg)
    view_features = None
    if ctx.views is not None:  # every rank extracts: extraction gathers across ranks under DDP
        view_features = [extract_features(item.encoder, view, cfg.batch_size, ctx.device, shard=True)
                         for view in ctx.views]
    if not distributed.is_main():
        return None
    train, unlabeled = feats["train"], None
    if ctx.labeled_index is not None:  # few-label: banks and probes see the labeled subset only
        unlabeled = train.features
        train = Split(train.features[ctx.labeled_index], train.labels[ctx.labeled_index])  # in memory
    evaluation = evaluate_features(train, feats["val"], feats["test"], cfg, ctx.device, unlabeled)
    metrics = evaluation.metrics
    if view_features is not None:
        metrics["alignment"] = metrics["quality"]["alignment"] = alignment(*view_features)
    metrics.update(source=item.source, identity=item.identity)
    metrics["timings_s"]["features_s"] = features_s
    final = feats["test"] if feats["test"] is not None else feats["val"]
    evaluation.extras = _report_extras(feats["train"], final, ctx.query_index, ctx.map_index,
                                       cfg.knn.backend)
    if ctx.labeled_index is not None:  # the retrieval grid's neighbours index the full train split
        metrics["labeled_train_images"] = len(ctx.labeled_index)
    if not cfg.cache_features:  # on-disk features served this evaluation only
        for split in feats.values():
            if split is not None and isinstance(split.features, FeatureArray):
                ctx.feature_cache.discard(split.features)
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
    write_report(run_dir, report, map_method=cfg.report_map, seed=cfg.seed, progress=cfg.progress)


def evaluate(cfg: EvaluateConfig) -> Path:
    """Evaluate every encoder in ``cfg.encoders``; writes ``metrics.json`` (with the settings used), the
    comparison table and ``report.md`` / ``report.html`` with pictures to ``out_dir/name``."""
    check_evaluate(cfg)  # before any data or model: a bad setting fails in one line
    _check_scale(cfg)
    device = distributed.setup(cfg.device)
    with rundir.claim(Path(cfg.out_dir) / cfg.name) as run:
        _evaluate_into(run, cfg, device)
    return run.path


def _check_scale(cfg: EvaluateConfig) -> None:
    """The settings of the feature cache and of on-disk features (ConfigError in one line)."""
    choose("feature_cache_dtype", cfg.feature_cache_dtype, CACHE_DTYPES)
    number("feature_chunk_rows", cfg.feature_chunk_rows, 1, none="from data.memory_limit_gb and the feature width")
    number("knn.recall_queries", cfg.knn.recall_queries, 0, what="0: no recall measured for ivf / hnsw")


def _feature_caches(cfg: EvaluateConfig, run_dir: Path) -> tuple[Path | None, FeatureCache]:
    """(the decoded splits' cache folder or None, the streamed splits' cache): ``feature_cache_dir`` or
    ``<run dir>/cache``; the run's own folder is swept of what a killed run left half written."""
    root = Path(cfg.feature_cache_dir).expanduser() if cfg.feature_cache_dir else run_dir / "cache"
    cache = FeatureCache(root, cfg.feature_cache_dtype, reuse=cfg.cache_features,
                         progress=cfg.progress and distributed.is_main())
    if not cfg.feature_cache_dir and distributed.is_main():
        cache.sweep()  # under the run directory's lock: no other run writes here
    return (root if cfg.cache_features else None), cache


def _evaluate_into(run: rundir.RunDirectory, cfg: EvaluateConfig, device: torch.device) -> None:
    run_dir = run.path
    data = build_dataset(cfg.data, cfg.seed, progress=cfg.progress)
    if data.train.labels is None:
        raise ValueError(f"evaluation needs labels; dataset {cfg.data.name!r} has none")
    check_classes(data.train.labels, cfg.data.name, "evaluation")
    check_labels_per_class(data.train.labels, cfg.labels_per_class)
    splits = {"train": data.train, "val": _split(data.val), "test": _split(data.test)}
    final = splits["test"] if splits["test"] is not None else splits["val"]
    if final is None:
        raise ValueError(f"dataset {cfg.data.name!r} has no labeled val or test split: set data.test_fraction > 0 "
                         f"(and data.val_fraction > 0 to choose k, T and the probes on val)")
    encoders = resolve_encoders(list(cfg.encoders), cfg.arch, cfg.seed)
    run.write_config(cfg)  # the data and every encoder resolved: the config describes this evaluation
    view_split = "val" if splits["val"] is not None else "train"
    views = None
    if cfg.quality_images:
        views = alignment_views(splits[view_split].images, cfg.alignment_views, cfg.quality_images, cfg.seed)
    map_order = torch.randperm(len(final), generator=torch.Generator().manual_seed(cfg.seed))
    cache_dir, feature_cache = _feature_caches(cfg, run_dir)
    ctx = _Context(splits=splits, final=final, views=views, device=device,
                   map_index=map_order[:cfg.report_points].sort().values,
                   query_index=retrieval_queries(final.labels, 6, cfg.seed),
                   cache_dir=cache_dir, feature_cache=feature_cache,
                   labeled_index=None if cfg.labels_per_class is None else per_class_subset(
                       data.train.labels, cfg.labels_per_class, seed=cfg.seed))

    evaluations = {item.label: _evaluate_encoder(item, ctx, cfg) for item in encoders}
    if not distributed.is_main():
        return
    results = {label: evaluation.metrics for label, evaluation in evaluations.items()}
    summary = {
        "dataset": cfg.data.name,
        "reported_on": "test" if splits["test"] is not None else "val",
        "num_images": {split: (0 if images is None else len(images)) for split, images in splits.items()},
        "split_origin": dict(data.origin),
        "labeled_train_images": len(splits["train"]) if ctx.labeled_index is None else len(ctx.labeled_index),
        "class_names": list(data.train.classes),
        "alignment_views": {**to_dict(cfg.alignment_views), "images": 0 if views is None else len(views[0]),
                            "split": view_split},
        "settings": to_dict(cfg),
        "encoders": results,
        "table": format_table(results),
    }
    write_json(run_dir / "metrics.json", summary)
    if cfg.report:
        _write_report(run_dir, summary, evaluations, encoders, ctx, cfg)
    print(summary["table"])

