"""Evaluation entry point: several encoders on one dataset -> kNN, linear probe, label-free quality -> one table.

Hyperparameters (kNN k and temperature when ``knn.select_on_val``, the probe's regularisation) are chosen on the
validation split; the test split is read once per encoder with the chosen settings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reprlab import distributed
from reprlab.checkpoint import load_encoder, read_meta, write_json
from reprlab.config import EncoderConfig, EvaluateConfig, save_config
from reprlab.data.datasets import ImageSet, load_dataset
from reprlab.evaluate.features import cache_key, cached_features, extract_features
from reprlab.models.encoders import PixelEncoder, create_encoder


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def resolve_encoders(refs: list[str], arch: EncoderConfig, seed: int = 0) -> list[tuple[str, nn.Module, str]]:
    """``[(label, encoder, identity)]`` for run directories, ``random`` (the architecture of the first run
    directory in ``refs``, else ``arch``, untrained, seeded) and ``pixels`` (raw pixels)."""
    run_dirs = [r for r in refs if r not in ("random", "pixels")]
    resolved = []
    for ref in refs:
        if ref == "pixels":
            resolved.append(("pixels", PixelEncoder(), "pixels"))
        elif ref == "random":
            torch.manual_seed(seed)
            if run_dirs:
                spec = read_meta(run_dirs[0])["encoder"]
                encoder = create_encoder(spec["name"], **spec.get("kwargs", {}))
            else:
                spec = {"name": arch.name, "kwargs": arch.kwargs}
                encoder = create_encoder(arch.name, pretrained=arch.pretrained, weights=arch.weights, **arch.kwargs)
            resolved.append((f"random {spec['name']}", encoder, f"random:{spec}:{seed}"))
        else:
            path = Path(ref)
            resolved.append((path.name, load_encoder(path), _file_digest(path / "encoder.safetensors")))
    return resolved


def evaluate_features(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None,
                      test: tuple[torch.Tensor, torch.Tensor] | None, cfg: EvaluateConfig) -> dict[str, Any]:
    """kNN + linear probe + label-free quality of cached features: (features, labels) per split."""
    from reprlab.evaluate.knn import knn_classify, select_knn
    from reprlab.evaluate.linear_probe import sklearn_linear_probe
    from reprlab.evaluate.quality import effective_rank, embedding_std

    (bank, bank_labels), final = train, (test if test is not None else val)
    metrics: dict[str, Any] = {"reported_on": "test" if test is not None else "val",
                               "embedding_std": float(embedding_std(bank)),
                               "effective_rank": float(effective_rank(bank)), "feature_dim": int(bank.shape[1])}
    k, temperature = cfg.knn.k, cfg.knn.temperature
    if cfg.knn.select_on_val and val is not None:
        chosen = select_knn(bank, bank_labels, val[0], val[1], ks=tuple(cfg.knn.ks),
                            temperatures=tuple(cfg.knn.temperatures), backend=cfg.knn.backend)
        k, temperature = chosen["k"], chosen["temperature"]
        metrics["knn_val_top1"] = chosen["val_top1"]
    result = knn_classify(bank, bank_labels, final[0], k=k, temperature=temperature, backend=cfg.knn.backend)
    metrics.update(knn_top1=result.topk(final[1], 1), knn_top5=result.topk(final[1], 5), knn_k=k,
                   knn_temperature=temperature)
    if cfg.linear_probe and val is not None:
        probe = sklearn_linear_probe(bank, bank_labels, val[0], val[1])
        metrics.update(linear_probe_top1=probe.evaluate(final[0], final[1]), linear_probe_val_top1=probe.val_top1,
                       linear_probe_params=probe.hyperparameters)
    return metrics


def format_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| encoder | kNN top-1 | linear probe top-1 | effective rank |", "| --- | --- | --- | --- |"]
    for label, m in results.items():
        probe = f"{100 * m['linear_probe_top1']:.2f}" if "linear_probe_top1" in m else "-"
        lines.append(f"| {label} | {100 * m['knn_top1']:.2f} | {probe} | {m['effective_rank']:.1f} |")
    return "\n".join(lines)


def _split(data: ImageSet | None) -> ImageSet | None:
    return data if data is not None and data.labels is not None else None


def evaluate(cfg: EvaluateConfig) -> Path:
    """Evaluate every encoder in ``cfg.encoders``; writes ``metrics.json`` and ``report.md`` to the run dir."""
    device = distributed.setup(cfg.device)
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    data = load_dataset(cfg.data.name, root=cfg.data.root, download=cfg.data.download,
                        val_fraction=cfg.data.val_fraction, image_size=cfg.data.image_size, limit=cfg.data.limit,
                        seed=cfg.seed)
    if data.train.labels is None:
        raise ValueError(f"evaluation needs labels; dataset {cfg.data.name!r} has none")
    splits = {"train": data.train, "val": _split(data.val), "test": _split(data.test)}
    cache_dir = run_dir / "cache" if cfg.cache_features else None
    results: dict[str, dict[str, Any]] = {}
    for label, encoder, identity in resolve_encoders(list(cfg.encoders), cfg.arch, cfg.seed):
        feats = {}
        for split, images in splits.items():
            if images is None:
                feats[split] = None
                continue
            key = cache_key(encoder=identity, dataset=cfg.data.name, split=split, n=len(images),
                            image_size=cfg.data.image_size, limit=cfg.data.limit, seed=cfg.seed,
                            val_fraction=cfg.data.val_fraction)
            features = cached_features(cache_dir, key, lambda im=images: extract_features(
                encoder, im.images, cfg.batch_size, device))
            feats[split] = (features, images.labels)
        results[label] = evaluate_features(feats["train"], feats["val"], feats["test"], cfg)
        print(f"{label}: kNN top-1 {100 * results[label]['knn_top1']:.2f}%"
              + (f", linear probe top-1 {100 * results[label]['linear_probe_top1']:.2f}%"
                 if "linear_probe_top1" in results[label] else ""))
    table = format_table(results)
    write_json(run_dir / "metrics.json", {"dataset": cfg.data.name, "encoders": results})
    (run_dir / "report.md").write_text(f"# Evaluation on {cfg.data.name}\n\n{table}\n")
    print(table)
    return run_dir
