r"""Fine-tuning policies at 1% / 10% of CIFAR-10 labels vs scratch, with the share of parameters each trains.

Every fine-tuning policy from an encoder pretrained by reprlab (a SimCLR ResNet, or a small ViT for ``lora``),
beside the same architecture trained from scratch; test top-1, mean ± std over seeds.

    python scripts/benchmark.py finetune --encoder runs/simclr_cifar10            # the README table
    python scripts/benchmark.py finetune --encoder /tmp/runs/tiny --limit 600 --epochs 1 1 --seeds 0 \
        --test-limit 500                                                          # smoke run
    python scripts/benchmark.py finetune --encoder runs/mae_vit_cifar10_cpu --rows linear_probe llrd full lora \
        scratch                                                                   # LoRA on a small ViT

Rows: ``linear_probe``, ``partial``, ``llrd``, ``gradual``, ``lp_ft``, ``full`` and ``lora`` (rank-8 adapters
of the attention projections, ``configs/finetune/lora_cifar10.yaml``; a convnet gets conv LoRA) from the
pretrained encoder, and ``full`` from random initialization (supervised from scratch, the architecture read
from the encoder's run). Each row trains from its recipe ``configs/finetune/<row>_cifar10.yaml`` (optimizer,
learning rate, policy parameters, augmentation) with the encoder, label fraction, epochs, seeds and data
overridden here; the overrides are stored in the JSON line, so that config plus those overrides reproduces a
README row.
``--set key=value ...`` adds overrides to every row (after the benchmark's own), e.g. a ViT's own learning rate.
Policy schedules follow the epochs: ``gradual`` unfreezes one group every ``max(1, epochs // 10)`` epochs,
``lp_ft`` probes for ``max(1, epochs // 3)`` epochs. Protocol (reprlab.stages.finetune): the labeled subset
is stratified and seeded per seed; 2% of train (1,000 images) is the validation split; the epoch with the
best validation top-1 is kept; the 10,000 test images are scored once, at the end. "trained" is the share of
the classifier's parameters (encoder + head, before LoRA's adapters) in the row's optimizer: LoRA's adapters +
head over encoder + head; 100% for ``full``, and for ``gradual`` and ``lp_ft``, whose optimizer holds every
parameter for the epochs that unfreeze it. Prints a markdown table and appends one JSON line to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
ROWS = ("linear_probe", "partial", "llrd", "gradual", "lp_ft", "full", "lora", "scratch")
ROW_LABELS = {"scratch": "full, random init (supervised from scratch)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", required=True, help="pretraining run, e.g. runs/simclr_cifar10")
    parser.add_argument("--data", default="npz:../shared/data/cifar10", help="dataset (relative to the repo)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1], help="label fractions")
    parser.add_argument("--epochs", type=int, nargs="+", default=[60, 30],
                        help="epochs per label fraction, in the order of --fractions (SimCLR: 60 at 1%%, "
                             "30 at 10%%)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="policies to compare")
    parser.add_argument("--batch-size", type=int, default=None, help="override the configs' batch size (64)")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="validation share of train")
    parser.add_argument("--limit", type=int, default=None, help="train images before labels are subset")
    parser.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-dir", default="runs/bench/finetune", help="where the fine-tuning runs go")
    parser.add_argument("--out", default="runs/bench/finetune.jsonl", help="JSON-lines file to append to")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every row, after the benchmark's own (e.g. optim.lr=2.5e-4 "
                             "for a ViT's full fine-tuning); stored with each cell")


def epochs_per_fraction(args: argparse.Namespace) -> list[int]:
    """--epochs, one value per --fractions entry (a single value applies to all)."""
    epochs = args.epochs * len(args.fractions) if len(args.epochs) == 1 else args.epochs
    if len(epochs) != len(args.fractions):
        raise SystemExit(f"benchmark.py finetune: error: give one --epochs value per fraction "
                         f"({len(args.fractions)}), got {args.epochs}")
    return epochs


def row_overrides(row: str, args: argparse.Namespace, fraction: float, epochs: int,
                  arch: dict[str, Any]) -> list[str]:
    """Overrides on top of configs/finetune/<row>_cifar10.yaml for one table cell."""
    overrides = [
        f"name={row}_{fraction:g}", f"out_dir={args.out_dir}", f"data.name={args.data}",
        f"data.val_fraction={args.val_fraction}", f"label_fraction={fraction}", f"train.epochs={epochs}",
        f"seeds={json.dumps(args.seeds)}", f"train.device={args.device}", f"train.precision={args.precision}",
        "train.progress=false", "train.resume=false",
    ]
    if args.limit is not None:
        overrides.append(f"data.limit={args.limit}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if row == "scratch":  # the SimCLR encoder's architecture, untrained
        overrides += ["encoder=random", f"arch.name={arch['name']}",
                      f"arch.kwargs={json.dumps(arch['kwargs'])}"]
    else:
        overrides.append(f"encoder={args.encoder}")
    if row == "gradual":
        overrides.append(f"policy.params.epochs_per_group={max(1, epochs // 10)}")
    if row == "lp_ft":
        overrides.append(f"policy.params.probe_epochs={max(1, epochs // 3)}")
    return overrides + list(args.set)


def run_cell(row: str, args: argparse.Namespace, fraction: float, epochs: int,
             arch: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one (row, fraction) over every seed: test/val top-1 per seed, mean and std of test top-1."""
    from reprlab.config import FinetuneConfig, load_config
    from reprlab.stages.finetune import finetune

    overrides = row_overrides(row, args, fraction, epochs, arch)
    config_path = REPO_ROOT / "configs" / "finetune" / f"{row}_cifar10.yaml"
    cfg = load_config(FinetuneConfig, config_path, overrides)
    start = time.perf_counter()
    run_dir = finetune(cfg)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    runs = metrics.get("runs", [metrics])  # one seed: metrics.json is that run's
    test = [r["test_top1"] for r in runs]
    first_run = run_dir if (run_dir / "meta.json").is_file() else run_dir / f"seed{args.seeds[0]}"
    trained = trained_parameters(cfg, json.loads((first_run / "meta.json").read_text())["num_classes"])
    return {"row": row, "fraction": fraction, "epochs": epochs, "train_images": runs[0]["train_images"],
            "test_top1": test, "mean": _mean(test), "std": _std(test),
            "val_top1": [r["val_top1"] for r in runs], "best_epoch": [r["best_epoch"] for r in runs],
            **trained, "wall_s": wall, "config": str(config_path.relative_to(REPO_ROOT)), "overrides": overrides}


def trained_parameters(cfg: Any, num_classes: int) -> dict[str, Any]:
    """Parameters the row's optimizer updates (at any epoch: the policy's parameter groups) over those of the
    classifier (encoder + head; for LoRA counted before its adapters are added), on a fresh copy of it."""
    from reprlab.finetune.classifier import Classifier
    from reprlab.finetune.policies import build_policy
    from reprlab.stages.finetune import source_encoder

    with torch.random.fork_rng(devices=[]):  # building a head draws numbers: leave the caller's stream alone
        classifier = Classifier(source_encoder(cfg), num_classes, dropout=cfg.head.dropout, init=cfg.head.init)
    total = sum(p.numel() for p in classifier.parameters())
    policy = build_policy(cfg.policy.name, cfg.policy.params)
    groups = policy.attach(classifier, cfg.optim.weight_decay, cfg.optim.exclude_bn_bias)
    trained = sum(p.numel() for group in groups for p in group["params"])
    return {"trained_params": trained, "total_params": total, "trained_fraction": trained / total}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(cells: list[dict[str, Any]], fractions: list[float]) -> str:
    rows = list(dict.fromkeys(c["row"] for c in cells))
    by_key = {(c["row"], c["fraction"]): c for c in cells}
    header = "| policy | trained | " + " | ".join(f"{100 * f:g}% labels" for f in fractions) + " |"
    lines = [header, "| --- | ---: |" + " --- |" * len(fractions)]
    for row in rows:
        values = []
        for fraction in fractions:
            cell = by_key.get((row, fraction))
            values.append(f"{100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}" if cell else "-")
        share = next(c["trained_fraction"] for c in cells if c["row"] == row)
        lines.append(f"| {ROW_LABELS.get(row, row)} | {100 * share:.3g}% | " + " | ".join(values) + " |")
    return "\n".join(lines)


def budget(cells: list[dict[str, Any]], args: argparse.Namespace) -> str:
    per_fraction = ", ".join(
        f"{100 * f:g}%: {e} epochs on {next((c['train_images'] for c in cells if c['fraction'] == f), '?')} "
        f"labeled images" for f, e in zip(args.fractions, args.epochs))
    wall = sum(c["wall_s"] for c in cells)
    batch = args.batch_size or "from the configs (64)"
    return (f"Budget: {per_fraction}; seeds {args.seeds}; batch {batch}; val {args.val_fraction:g} of train; "
            f"precision {args.precision}; total wall {wall / 60:.1f} min.")


def _limit_test_split(test_limit: int | None) -> None:
    """Smoke runs: score only the first ``test_limit`` test images (wraps the stage's build_dataset)."""
    if test_limit is None:
        return
    from reprlab.stages import finetune as train_module

    build_dataset = train_module.build_dataset

    def limited(*args: Any, **kwargs: Any):
        data = build_dataset(*args, **kwargs)
        if data.test is not None:
            data.test = data.test.subset(torch.arange(min(test_limit, len(data.test))))
        return data

    train_module.build_dataset = limited


def main(args: argparse.Namespace) -> int:
    args.epochs = epochs_per_fraction(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.encoder = str(Path(args.encoder).resolve())  # before chdir: relative to where the command was typed
    args.out_dir = str(Path(args.out_dir).resolve())
    out = Path(args.out).resolve()
    sys.path.insert(0, str(REPO_ROOT))
    os.chdir(REPO_ROOT)  # data and config paths are relative to the repo root
    from bench.common import append_jsonl, environment, log
    from reprlab.checkpoint import read_meta

    meta = read_meta(args.encoder)
    arch = {"name": meta["encoder"]["name"], "kwargs": meta["encoder"].get("kwargs", {})}
    _limit_test_split(args.test_limit)
    cells = []
    for fraction, epochs in zip(args.fractions, args.epochs):
        for row in args.rows:
            log(f"finetune benchmark: {row}, {100 * fraction:g}% labels, {epochs} epochs, seeds {args.seeds}")
            cell = run_cell(row, args, fraction, epochs, arch)
            log(f"  test top-1 {100 * cell['mean']:.2f} ± {100 * cell['std']:.2f} ({cell['wall_s']:.0f} s)")
            cells.append(cell)
    table = markdown(cells, args.fractions)
    print(f"\nCIFAR-10 test top-1 (%), mean ± std over seeds {args.seeds}; encoder {args.encoder} "
          f"({meta.get('method', '?')}, {arch['name']}); trained: the share of encoder + head parameters the "
          f"policy updates\n")
    print(table)
    print("\n" + budget(cells, args))
    record = {"benchmark": "finetune", "encoder": args.encoder, "method": meta.get("method"),
              "arch": arch["name"], "data": args.data, "fractions": args.fractions, "epochs": args.epochs,
              "seeds": args.seeds, "limit": args.limit, "test_limit": args.test_limit,
              "trained_fraction": {c["row"]: c["trained_fraction"] for c in cells}, "cells": cells,
              "table": table, "environment": environment()}
    log(f"appended to {append_jsonl(out, record)}")
    return 0
