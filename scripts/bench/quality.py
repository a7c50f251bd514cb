"""Pretraining methods vs lightly's implementations: CIFAR-10 kNN, probe, effective rank.

Every pretraining method at the same encoder, data and epochs, beside ``random`` and ``pixels`` and beside
lightly's implementation of the same method, scored by kNN and linear-probe top-1 on CIFAR-10 test.

    python scripts/benchmark.py quality                       # the README table (hours on a 2-core CPU)
    python scripts/benchmark.py quality --epochs 1 --limit 1000 --eval-limit 1000 --test-limit 500  # smoke
    python scripts/benchmark.py quality --methods byol dino --seeds 0 1 2   # mean ± std over 3 seeds
    python scripts/benchmark.py quality --methods jigsaw --set method.params.normalize_tiles=true  # a variant

Each method is trained from its ``configs/pretrain/<method>_cifar10.yaml`` (optimizer, batch size and method
parameters) with the encoder, epochs, data and seed overridden to the same values for all (``--batch-size``
imposes one batch size too; ``--set key=value ...`` overrides config keys of every method). Batch size is a
method's own choice: SimCLR needs large batches for its negatives, the proxy tasks and autoencoders learn more
from more optimizer steps. Every method with a lightly twin (bench.peer_methods.LIGHTLY_TWINS: simclr, byol,
simsiam, moco_v2, moco_v3, dino, barlow_twins, vicreg) is then trained by lightly too (``--no-lightly``: not):
lightly's heads, losses, momentum updates and per-sample transforms in DataLoader workers, as its examples,
with the settings of reprlab's method built from the same config (view pipelines, temperatures, queue,
momentum schedule, loss weights, head widths), the same encoder module (normalization inside, so lightly's
transforms do not normalize), batch size and optimizer and schedule (reprlab's ``build_optimization``; rescaled
where lightly's loss has another scale, so both take the same updates), so that only the implementation
differs; each twin's docstring lists what remains different.

``--seeds``: every method and its lightly twin trained once per seed (initialization, data order,
augmentation and the probe's seed; the evaluation splits stay those of the first seed), reprlab's run of a
seed first, then lightly's; the table shows mean ± std over the seeds.

Evaluation (reprlab.evaluate.suite.evaluate_features): features of the train split (the kNN bank and the
probe's training set), the validation split (carved from train, for the probe's hyperparameters) and the test
split; kNN top-1 at fixed k=200, T=0.1 (the CIFAR monitor protocol of InstDisc/MoCo/lightly) and k=20, T=0.07
(DINO); linear-probe top-1 (reprlab's torch probe, lr and weight decay chosen on val); effective rank (RankMe)
and embedding std (per-dimension std of the L2-normalized features: 0 at collapse) of the test features. Wall
time is pretraining only. Encoders of the patch tasks embed an image as the mean over a 3x3 grid of patches
(their ``pool_patches``); each such pooling is also scored on the untrained network (``random ...,
patch-pooled``). Prints a markdown table (bench.quality_table) and appends one JSON line to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import peer_methods, peer_parts, peers
from bench.common import append_jsonl
from bench.quality_table import format_table, summarize_rows

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_METHODS = ("simclr", "autoencoder", "rotation", "jigsaw", "relative_position")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs for every method")
    parser.add_argument("--limit", type=int, default=None,
                        help="pretraining images (stratified subset of the 50k train images; default all)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="pretraining batch for every method (default: each method config's own; a lightly "
                             "twin always uses the same as its reprlab method)")
    parser.add_argument("--encoder", default="resnet18", help="create_encoder name, shared by every method")
    parser.add_argument("--cifar-stem", action="store_true",
                        help="3x3/1 stem without max-pool (the CIFAR ResNet; 15x the FLOPs: GPU-scale)")
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS),
                        help="config stems: configs/pretrain/<name>_cifar10.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every method, e.g. method.params.grayscale_p=0.3 (variants)")
    parser.add_argument("--no-lightly", action="store_true", help="skip every lightly twin")
    parser.add_argument("--lightly-workers", type=int, default=2, help="DataLoader workers for lightly's run")
    parser.add_argument("--data", default="npz:../shared/data/cifar10",
                        help="dataset (paths relative to the repo root)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="train images for the kNN bank and the probe (val is 10%% of them; default all)")
    parser.add_argument("--test-limit", type=int, default=None, help="test images to score (default all 10k)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="fp32",
                        help="auto | fp32 | bf16 | fp16: pretraining and feature extraction (fp16: fp32 features)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds: each method (and its lightly twin) runs once per seed")
    parser.add_argument("--workdir", default="runs/bench/quality", help="run directories (replaced)")
    parser.add_argument("--out", default="runs/bench/quality.jsonl", help="JSON-lines file to append to")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


# ---------------------------------------------------------------------------------------------------- configs


def method_config(method: str, args: argparse.Namespace, seed: int):
    """The method's CIFAR-10 config with the shared budget (encoder, batch, epochs, data, seed) imposed."""
    from reprlab.config import PretrainConfig, load_config

    path = REPO_ROOT / "configs" / "pretrain" / f"{method}_cifar10.yaml"
    cfg = load_config(PretrainConfig, path, args.set)
    kwargs = {"cifar_stem": True} if args.cifar_stem else {}
    return dataclasses.replace(
        cfg, name=f"quality_{method}", out_dir=args.workdir,
        data=dataclasses.replace(cfg.data, name=args.data, limit=args.limit),
        encoder=dataclasses.replace(cfg.encoder, name=args.encoder, kwargs=kwargs, pretrained=False,
                                    weights=None),
        train=dataclasses.replace(cfg.train, epochs=args.epochs,
                                  batch_size=args.batch_size or cfg.train.batch_size,
                                  device=args.device, precision=args.precision, seed=seed, resume=False,
                                  progress=args.progress, checkpoint_every_steps=0),
        monitor=dataclasses.replace(cfg.monitor, every_epochs=0),
    )


# --------------------------------------------------------------------------------------------------- training


def train_reprlab(method: str, args: argparse.Namespace, seed: int) -> tuple[torch.nn.Module, float, dict[str, Any]]:
    from reprlab.checkpoint import load_encoder
    from reprlab.stages.pretrain import pretrain

    cfg = method_config(method, args, seed)
    run_dir = Path(cfg.out_dir) / cfg.name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: no resume, no appended metrics
    start = time.perf_counter()
    pretrain(cfg)
    wall = time.perf_counter() - start
    details = {"batch_size": cfg.train.batch_size, "optim": dataclasses.asdict(cfg.optim),
               "params": dict(cfg.method.params), "run_dir": str(run_dir)}
    return load_encoder(run_dir), wall, details


def train_lightly(method: str, args: argparse.Namespace, seed: int) -> tuple[torch.nn.Module, float, dict[str, Any]]:
    """lightly's twin of ``method`` on reprlab's encoder, with the settings of reprlab's method from its
    config and its optimizer and schedule (bench.peer_methods)."""
    from reprlab import distributed
    from reprlab.data.datasets import load_dataset
    from reprlab.hardware import resolve_numerics
    from reprlab.models.encoders import create_encoder
    from reprlab.optim import build_optimization
    from reprlab.ssl import build_method
    from reprlab.stages.common import seed_everything

    cfg = method_config(method, args, seed)
    params, batch_size = dict(cfg.method.params), cfg.train.batch_size
    device = distributed.setup(args.device)
    seed_everything(seed)
    data = load_dataset(cfg.data.name, val_fraction=cfg.data.val_fraction, limit=cfg.data.limit, seed=seed)
    encoder = create_encoder(cfg.encoder.name, **cfg.encoder.kwargs)
    with torch.random.fork_rng(devices=[]):  # reprlab's method for its settings only: no numbers drawn here
        reference = build_method(method, encoder, params)
    total_steps = (len(data.train) // batch_size) * args.epochs  # drop_last batches, as the loader below
    spec = peer_parts.TwinSpec(encoder, encoder.feature_dim, peer_parts.method_settings(method, params),
                               reference, data.train.images.shape[-1], False, max(total_steps, 1))
    twin = peer_methods.build_twin(method, spec)
    del reference
    loader = peers.per_sample_loader(peers.PerSampleViews(data.train.images, None, twin.transform), batch_size,
                                     args.lightly_workers, seed=seed, persistent=True)
    twin = twin.to(device)
    optimizer, scheduler = build_optimization(cfg.optim, twin, batch_size, len(loader), args.epochs)
    precision = resolve_numerics(args.precision, False, device, encoder).precision  # auto as reprlab's runs
    step = peers.twin_step(twin, optimizer, device, scheduler, precision, cfg.train.grad_clip)
    wall = peers.train_lightly(twin, step, loader, args.epochs, progress=args.progress, name=method)
    return twin.evaluated_encoder().eval(), wall, {
        "lightly": peers.lightly_version(), "workers": args.lightly_workers, "batch_size": batch_size,
        "optim": dataclasses.asdict(cfg.optim), "twin": type(twin).__name__}


# ------------------------------------------------------------------------------------------------- evaluation


def evaluation_data(args: argparse.Namespace):
    from reprlab.data.datasets import load_dataset

    data = load_dataset(args.data, val_fraction=0.1, limit=args.eval_limit, seed=args.seeds[0])
    test = data.test
    if test is None or test.labels is None:
        raise ValueError(f"dataset {args.data!r} has no labeled test split to score on")
    if args.test_limit is not None and args.test_limit < len(test):
        test = test.subset(torch.arange(args.test_limit))
    return {"train": data.train, "val": data.val, "test": test}


def score(encoder: torch.nn.Module, splits: dict, device: torch.device, seed: int,
          precision: str = "fp32") -> dict[str, Any]:
    """kNN (k=200, T=0.1 and k=20, T=0.07, fixed: no selection) and linear-probe top-1 on the test split, and
    the test features' effective rank and embedding std; features extracted at ``precision`` (the run's)."""
    from reprlab.config import EvaluateConfig, KNNConfig
    from reprlab.evaluate.features import extract_features
    from reprlab.evaluate.knn import knn_classify
    from reprlab.evaluate.quality import effective_rank, embedding_std
    from reprlab.evaluate.suite import Split, evaluate_features

    feats = {name: Split(extract_features(encoder, split.images, 512, device, precision=precision),
                         split.labels)
             for name, split in splits.items()}
    if not all(bool(split.features.isfinite().all()) for split in feats.values()):
        return {"non_finite_features": True}  # a diverged run: no score, and the table says so
    cfg = EvaluateConfig(knn=KNNConfig(k=200, temperature=0.1, select_on_val=False), retrieval_ks=[],
                         linear_probe=True, sklearn_probe=False, quality_images=0, report=False, seed=seed)
    metrics = evaluate_features(feats["train"], feats["val"], feats["test"], cfg, device).metrics
    knn20 = knn_classify(feats["train"].features, feats["train"].labels, feats["test"].features, k=20,
                         temperature=0.07)
    metrics["knn20_top1"] = knn20.topk(feats["test"].labels, 1)
    metrics["test_effective_rank"] = effective_rank(feats["test"].features)
    metrics["test_embedding_std"] = embedding_std(feats["test"].features)
    return metrics


def run_seed(seed: int, args: argparse.Namespace, record: Any, with_lightly: bool) -> None:
    """The baselines, then every method (reprlab, then its lightly twin) at one training seed."""
    from reprlab.config import EncoderConfig
    from reprlab.stages.evaluate import resolve_encoders

    arch = EncoderConfig(name=args.encoder, kwargs={"cifar_stem": True} if args.cifar_stem else {})
    for baseline in resolve_encoders(["random", "pixels"], arch, seed):
        record(baseline.label, baseline.encoder, None, seed)
    pooled_baselines: set[str] = set()
    for method in args.methods:
        encoder, wall, details = train_reprlab(method, args, seed)
        record(f"reprlab {method}", encoder, wall, seed, details)
        pooling = encoder.spec.get("patch_pooling")
        key = json.dumps(pooling, sort_keys=True)
        if pooling and key not in pooled_baselines:
            # `random` beside this run: the untrained network embedding images the same way (pooling alone)
            pooled_baselines.add(key)
            untrained = resolve_encoders([details["run_dir"], "random"], arch, seed)[1].encoder
            record(f"random {args.encoder}, patch-pooled as {method}", untrained, None, seed,
                   {"patch_pooling": pooling})
        if with_lightly and method in peer_methods.LIGHTLY_TWINS:
            encoder, wall, details = train_lightly(method, args, seed)
            record(f"lightly {method}", encoder, wall, seed, details)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO_ROOT))
    os.chdir(REPO_ROOT)  # data and config paths are relative to the repo root
    from reprlab import distributed

    device = distributed.setup(args.device)
    splits = evaluation_data(args)
    rows: list[dict[str, Any]] = []
    with_lightly = not args.no_lightly and peers.lightly_available()
    if not args.no_lightly and not with_lightly:
        print(peers.LIGHTLY_MISSING, file=sys.stderr)

    def record(label: str, encoder: torch.nn.Module, wall: float | None, seed: int, extra: dict | None = None) -> None:
        start = time.perf_counter()
        metrics = score(encoder, splits, device, seed, args.precision)
        eval_s = time.perf_counter() - start
        rows.append({"label": label, "seed": seed, "wall_s": wall, "eval_s": eval_s, "metrics": metrics,
                     **({"details": extra} if extra else {})})
        trained = f", pretraining {wall / 60:.1f} min" if wall is not None else ""
        if metrics.get("non_finite_features"):
            print(f"{label} (seed {seed}): non-finite features (training diverged), not scored{trained}", flush=True)
            return
        probe = 100 * metrics.get("linear_probe_top1", float("nan"))
        print(f"{label} (seed {seed}): kNN {100 * metrics['knn_top1']:.2f} / {100 * metrics['knn20_top1']:.2f}, "
              f"probe {probe:.2f}, effective rank {metrics['test_effective_rank']:.1f}, embedding std "
              f"{metrics['test_embedding_std']:.4f}{trained} (eval {eval_s:.0f} s)", flush=True)

    for seed in args.seeds:
        run_seed(seed, args, record, with_lightly)

    table = format_table(rows)
    print(table)
    result = {
        "bench": "quality", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "data": args.data,
        "encoder": args.encoder, "cifar_stem": args.cifar_stem, "epochs": args.epochs,
        "batch_size": args.batch_size, "precision": args.precision, "overrides": args.set, "seeds": args.seeds,
        "limit": args.limit, "eval_limit": args.eval_limit, "test_limit": args.test_limit,
        "eval_sizes": {name: len(split) for name, split in splits.items()}, "device": str(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "rows": rows, "summary": summarize_rows(rows), "table": table,
    }
    append_jsonl(args.out, result)
    return 0
