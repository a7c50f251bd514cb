"""Does the fast configuration learn as well? kNN top-1 after short fp32 and bf16 + channels_last runs.

    python scripts/benchmark.py pretrain --quality-check --quality-images 10000 --quality-epochs 2
    python scripts/benchmark.py pretrain --quality-check --quality-methods simclr rotation --quality-seeds 0 1 2

Two short pretraining runs through reprlab.stages.pretrain per method and seed (same data order and augmentation
draws): fp32 vs bf16 autocast + channels_last (what ``train.precision: auto`` picks on a processor with native
bf16), each from the method's ``configs/pretrain/<method>_cifar10.yaml`` (its optimizer, batch and parameters)
with the images, epochs, encoder and seed imposed; then the online kNN top-1 (fp32 features) on the held-out 10%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, environment, log, print_table
from bench.speed_setup import CONFIGS, FAST, encoder_kwargs
from reprlab.config import DataConfig, EncoderConfig, MonitorConfig, PretrainConfig, load_config


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--quality-check", action="store_true", help="kNN after short fp32 and bf16 runs")
    group.add_argument("--quality-images", type=int, default=10_000)
    group.add_argument("--quality-epochs", type=int, default=2)
    group.add_argument("--quality-seeds", type=int, nargs="+", default=[0])
    group.add_argument("--quality-methods", nargs="+", default=["simclr"],
                       help="config stems: configs/pretrain/<name>_cifar10.yaml")
    group.add_argument("--quality-dir", default=None, help="where the runs go (default: a temp folder)")


def run_config(args: argparse.Namespace, method: str, config: str, seed: int, out_dir: Path) -> PretrainConfig:
    precision, channels_last = CONFIGS[config]
    cfg = load_config(PretrainConfig, REPO_ROOT / "configs" / "pretrain" / f"{method}_cifar10.yaml")
    return dataclasses.replace(
        cfg, name=f"quality_{method}_{config}_seed{seed}", out_dir=str(out_dir),
        data=DataConfig(name=args.data, limit=args.quality_images, val_fraction=0.1),
        encoder=EncoderConfig(name=args.encoder, kwargs=encoder_kwargs(args)),
        train=dataclasses.replace(cfg.train, epochs=args.quality_epochs, device=args.device, precision=precision,
                                  channels_last=channels_last, seed=seed, progress=False, resume=False,
                                  checkpoint_every_steps=0),
        monitor=MonitorConfig(every_epochs=args.quality_epochs, knn_k=20, knn_temperature=0.07),
    )


def summary(rows: list[dict[str, Any]], method: str, config: str) -> dict[str, float]:
    values = [r["knn_top1"] for r in rows if r["method"] == method and r["config"] == config]
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from reprlab.stages.pretrain import pretrain

    if args.data == "random":
        raise SystemExit("--quality-check needs labeled images: pass --data npz:<dir> or a dataset name")
    out_dir = Path(args.quality_dir or tempfile.mkdtemp(prefix="reprlab-quality-"))
    rows = []
    for method in args.quality_methods:
        for seed in args.quality_seeds:
            for config in ("fp32", FAST):
                start = time.perf_counter()
                run_dir = pretrain(run_config(args, method, config, seed, out_dir))
                seconds = time.perf_counter() - start
                ends = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
                last = [r for r in ends if r.get("event") == "epoch_end"][-1]
                precision, channels_last = CONFIGS[config]
                rows.append({"method": method, "config": config, "precision": precision,
                             "channels_last": channels_last, "seed": seed, "knn_top1": last.get("knn_top1"),
                             "final_loss": last["loss"], "seconds": seconds})
                log(f"quality {method} {config} seed {seed}: knn top-1 {rows[-1]['knn_top1']}, {seconds:.0f} s")
    print_table(rows, ["method", "config", "precision", "channels_last", "seed", "knn_top1", "final_loss",
                       "seconds"],
                title=f"bf16 quality check: {args.quality_epochs} epoch(s) on {args.quality_images} images")
    summaries = {}
    for method in args.quality_methods:
        summaries[method] = {config: summary(rows, method, config) for config in ("fp32", FAST)}
        fp32, fast = summaries[method]["fp32"], summaries[method][FAST]
        print(f"{method}: kNN top-1 fp32 {100 * fp32['mean']:.2f} ± {100 * fp32['std']:.2f}, {FAST} "
              f"{100 * fast['mean']:.2f} ± {100 * fast['std']:.2f} over {fp32['seeds']} seed(s) "
              f"(difference {100 * (fast['mean'] - fp32['mean']):+.2f})")
    return {"bench": "pretrain_quality", "env": environment(), "args": vars(args), "results": rows,
            "summary": summaries, "runs_dir": str(out_dir)}
