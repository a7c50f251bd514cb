"""Does the fast configuration learn as well? kNN top-1 after short fp32 and bf16 + channels_last runs.

    python scripts/benchmark.py pretrain --quality-check --quality-images 10000 --quality-epochs 2

Two short pretraining runs through reprlab.stages.pretrain per seed (same data order and augmentation draws):
fp32 vs bf16 autocast + channels_last, then the online kNN top-1 (fp32 features) on the held-out 10%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import environment, log, print_table
from bench.speed_setup import CONFIGS, FAST, SGD, encoder_kwargs
from reprlab.config import DataConfig, EncoderConfig, MonitorConfig, OptimConfig, PretrainConfig, TrainConfig


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--quality-check", action="store_true", help="kNN after short fp32 and bf16 runs")
    group.add_argument("--quality-images", type=int, default=10_000)
    group.add_argument("--quality-epochs", type=int, default=2)
    group.add_argument("--quality-seeds", type=int, nargs="+", default=[0])
    group.add_argument("--quality-dir", default=None, help="where the runs go (default: a temp folder)")


def run_config(args: argparse.Namespace, config: str, seed: int, out_dir: Path) -> PretrainConfig:
    precision, channels_last = CONFIGS[config]
    return PretrainConfig(
        name=f"quality_{config}_seed{seed}", out_dir=str(out_dir),
        data=DataConfig(name=args.data, limit=args.quality_images, val_fraction=0.1),
        encoder=EncoderConfig(name=args.encoder, kwargs=encoder_kwargs(args)),
        optim=OptimConfig(name="sgd", schedule="cosine", **SGD),
        train=TrainConfig(epochs=args.quality_epochs, batch_size=args.batch_size, device=args.device,
                          precision=precision, channels_last=channels_last, seed=seed, progress=False,
                          resume=False, log_every=args.log_every),
        monitor=MonitorConfig(every_epochs=args.quality_epochs, knn_k=20, knn_temperature=0.07),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from reprlab.stages.pretrain import pretrain

    if args.data == "random":
        raise SystemExit("--quality-check needs labeled images: pass --data npz:<dir> or a dataset name")
    out_dir = Path(args.quality_dir or tempfile.mkdtemp(prefix="reprlab-quality-"))
    rows = []
    for seed in args.quality_seeds:
        for config in ("fp32", FAST):
            start = time.perf_counter()
            run_dir = pretrain(run_config(args, config, seed, out_dir))
            seconds = time.perf_counter() - start
            ends = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
            last = [r for r in ends if r.get("event") == "epoch_end"][-1]
            precision, channels_last = CONFIGS[config]
            rows.append({"config": config, "precision": precision, "channels_last": channels_last, "seed": seed,
                         "knn_top1": last.get("knn_top1"), "final_loss": last["loss"], "seconds": seconds})
            log(f"quality {config} seed {seed}: knn top-1 {rows[-1]['knn_top1']}, {seconds:.0f} s")
    mean = {c: statistics.mean(r["knn_top1"] for r in rows if r["config"] == c) for c in ("fp32", FAST)}
    print_table(rows, ["config", "precision", "channels_last", "seed", "knn_top1", "final_loss", "seconds"],
                title=f"bf16 quality check: {args.quality_epochs} epoch(s) on {args.quality_images} images")
    difference = mean[FAST] - mean["fp32"]
    print(f"kNN top-1 fp32 {mean['fp32']:.4f}, {FAST} {mean[FAST]:.4f} "
          f"(difference {difference:+.4f}; single short runs differ by about a point from seed noise alone)")
    return {"bench": "pretrain_quality", "env": environment(), "args": vars(args), "results": rows,
            "knn_top1_mean": mean, "difference": difference, "runs_dir": str(out_dir)}
