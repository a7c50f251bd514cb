r"""Distillation vs SimCLR at equal wall time: a small student on CIFAR-10, kNN and probe top-1.

A teacher trained longer (a reprlab run directory, or a SimCLR ResNet-18 trained here first) is distilled into
a smaller student (``configs/pretrain/distill_cifar10_cpu.yaml``: timm's ResNet-10-T, 4.9 M parameters); the
same student is then pretrained from scratch with SimCLR (``configs/pretrain/simclr_cifar10.yaml``) for the
same training time. Teacher, distilled student, SimCLR student and the untrained student are scored alike.

    python scripts/benchmark.py distill --teacher runs/simclr_cifar10          # the README table (~1.5 h here)
    python scripts/benchmark.py distill --teacher-epochs 20                     # teacher trained here (~2.5 h)
    python scripts/benchmark.py distill --teacher-epochs 1 --student-epochs 1 --limit 1000 --batch-size 128 \
        --eval-limit 1000 --test-limit 500 --calibration-images 512             # smoke (a few minutes)

Equal wall time: the budget W is the distilled student's training time (the sum of its epochs'
``epoch_time_s`` in metrics.jsonl: optimizer steps only, without data loading, monitoring or saving, which
both runs share). SimCLR's time per epoch on the student is measured by a one-epoch calibration run on
``--calibration-images`` images (the median images/s of its logged steps after the first, at the same batch
size), and SimCLR then trains ``round(W / epoch time)`` epochs (at least one), a complete cosine schedule
rather than a run cut off mid-schedule. Both training times are in the table, so a mismatch (a shared
machine's speed drifts) shows. The teacher's cost is not charged to the student: the premise of distillation
is a teacher that exists already.

Evaluation: ``bench.quality.score`` (kNN top-1 at k=200, T=0.1 and k=20, T=0.07 on a bank of the train split,
linear-probe top-1 with lr and weight decay chosen on val; CIFAR-10 test). Prints a markdown table and
appends one JSON line (with ``bench.common.environment()``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs" / "pretrain"
DISTILL_CONFIG = CONFIGS / "distill_cifar10_cpu.yaml"
SIMCLR_CONFIG = CONFIGS / "simclr_cifar10.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    teacher = parser.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", default=None,
                         help="a finished reprlab pretraining run directory, e.g. runs/simclr_cifar10")
    teacher.add_argument("--teacher-epochs", type=int, default=20,
                         help="without --teacher: SimCLR epochs of the teacher trained here first (default 20)")
    parser.add_argument("--teacher-encoder", default="resnet18",
                        help="architecture of the teacher trained here (create_encoder name)")
    parser.add_argument("--student", default="timm:resnet10t",
                        help="the student's create_encoder name (default timm's ResNet-10-T, 4.9 M parameters)")
    parser.add_argument("--student-epochs", type=int, default=20, help="distillation epochs of the student")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="pretraining batch of every run (default: the configs' 256)")
    parser.add_argument("--calibration-images", type=int, default=2560,
                        help="images of the one-epoch SimCLR run that measures its time per epoch")
    parser.add_argument("--limit", type=int, default=None,
                        help="pretraining images (stratified subset of the 50k train images; default all)")
    parser.add_argument("--data", default="npz:../shared/data/cifar10", help="dataset (relative to the repo)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="train images for the kNN bank and the probe (val is 10%% of them; default all)")
    parser.add_argument("--test-limit", type=int, default=None, help="test images to score (default all 10k)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every run")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (every pretraining run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--workdir", default="runs/bench/distill", help="run directories (replaced)")
    parser.add_argument("--out", default="benchmarks/results.jsonl", help="JSON-lines file to append to")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


# ---------------------------------------------------------------------------------------------------- training


def run_config(path: Path, name: str, encoder: str, epochs: int, args: argparse.Namespace,
               extra: Sequence[str] = (), limit: int | None = None):
    """The config at ``path`` with this benchmark's encoder, epochs, data, seed and run directory."""
    from reprlab.config import PretrainConfig, load_config

    overrides = [f"name={name}", f"out_dir={args.workdir}", f"data.name={args.data}", f"encoder.name={encoder}",
                 "encoder.kwargs={}", "encoder.pretrained=false", f"train.epochs={epochs}",
                 f"train.seed={args.seed}", f"train.device={args.device}", f"train.precision={args.precision}",
                 "train.resume=false", f"train.progress={str(args.progress).lower()}",
                 "train.checkpoint_every_steps=0", "monitor.every_epochs=0", *extra]
    limit = limit if limit is not None else args.limit
    if limit is not None:
        overrides.append(f"data.limit={limit}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    return load_config(PretrainConfig, path, overrides), overrides


def epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    """The epoch_end lines of a run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r.get("event") == "epoch_end"]


def train(path: Path, name: str, encoder: str, epochs: int, args: argparse.Namespace,
          extra: Sequence[str] = (), limit: int | None = None) -> dict[str, Any]:
    """Pretrain one fresh run; its directory, wall time (the whole call) and training time (its epochs)."""
    from bench.common import log
    from reprlab.stages.pretrain import pretrain

    cfg, overrides = run_config(path, name, encoder, epochs, args, extra, limit)
    run_dir = Path(cfg.out_dir) / cfg.name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: no resume, no appended metrics
    log(f"distill benchmark: {name}: {cfg.method.name} on {encoder}, {epochs} epochs")
    start = time.perf_counter()
    pretrain(cfg)
    wall = time.perf_counter() - start
    records = epoch_records(run_dir)
    return {"run_dir": str(run_dir), "method": cfg.method.name, "encoder": encoder, "epochs": epochs,
            "batch_size": cfg.train.batch_size, "wall_s": wall,
            "train_s": sum(r["epoch_time_s"] for r in records),
            "steps_per_epoch": records[0]["step"] if records else 0,
            "config": str(path.relative_to(REPO_ROOT)), "overrides": overrides}


def steady_images_per_s(run_dir: Path) -> float:
    """Median images/s of a run's logged step windows after the first (which pays for warm-up)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rates = [r["images_per_s"] for r in map(json.loads, filter(None, lines)) if "images_per_s" in r]
    if not rates:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no logged steps to time SimCLR by; raise "
                           f"--calibration-images above the batch size")
    return statistics.median(rates[1:] or rates)


def matching_epochs(budget_s: float, epoch_s: float) -> int:
    """The number of epochs whose time is closest to ``budget_s`` (at least one)."""
    if epoch_s <= 0:
        raise ValueError(f"epoch time must be positive, got {epoch_s}")
    return max(1, round(budget_s / epoch_s))


def simclr_at_budget(student: str, budget_s: float, steps_per_epoch: int,
                     args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the SimCLR student run of about ``budget_s`` training seconds, the calibration that sized it)."""
    cal = train(SIMCLR_CONFIG, "calibration_simclr_student", student, 1, args,
                extra=["train.log_every=1"], limit=args.calibration_images)
    rate = steady_images_per_s(Path(cal["run_dir"]))
    epoch_s = steps_per_epoch * cal["batch_size"] / rate
    epochs = matching_epochs(budget_s, epoch_s)
    calibration = {"images": args.calibration_images, "images_per_s": rate, "estimated_epoch_s": epoch_s,
                   "budget_s": budget_s, "epochs": epochs, "wall_s": cal["wall_s"]}
    from bench.common import log

    log(f"distill benchmark: SimCLR on the student at {rate:.0f} images/s: {epoch_s:.0f} s per epoch, "
        f"{epochs} epochs for the distilled student's {budget_s:.0f} s")
    return train(SIMCLR_CONFIG, "simclr_student", student, epochs, args), calibration


# ------------------------------------------------------------------------------------------------- reporting


def parameter_count(encoder: torch.nn.Module) -> int:
    return sum(p.numel() for p in encoder.parameters())


def markdown(rows: list[dict[str, Any]]) -> str:
    """Encoder, parameters, pretraining, kNN top-1 (both protocols) and probe top-1 per row."""
    lines = ["| encoder | params | pretraining | train time | kNN k=200 | kNN k=20 | probe |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        m = row["metrics"]
        seconds = row.get("train_s")
        trained = "-" if seconds is None else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
        lines.append(f"| {row['label']} | {row['params'] / 1e6:.1f} M | {row['pretraining']} | {trained} | "
                     f"{100 * m['knn_top1']:.2f} | {100 * m['knn20_top1']:.2f} | "
                     f"{100 * m.get('linear_probe_top1', float('nan')):.2f} |")
    return "\n".join(lines)


def teacher_run(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None]:
    """(the teacher's run directory, its training record when trained here)."""
    if args.teacher:
        from reprlab.checkpoint import read_meta

        read_meta(args.teacher)  # a one-line error when it is not a run directory
        return args.teacher, None
    run = train(SIMCLR_CONFIG, "teacher_simclr", args.teacher_encoder, args.teacher_epochs, args)
    return run["run_dir"], run


def describe(run: dict[str, Any] | None, meta: dict[str, Any] | None = None) -> str:
    if run is not None:
        return f"{run['method']}, {run['epochs']} epoch{'s' if run['epochs'] != 1 else ''}"
    if meta is not None:  # a given teacher: what its run directory says
        config = meta.get("config", {})
        return f"{meta.get('method', '?')}, {config.get('train', {}).get('epochs', '?')} epochs (given)"
    return "none"


def score_rows(entries: list[tuple[str, torch.nn.Module, dict[str, Any] | None, str]], splits: dict,
               device: torch.device, seed: int) -> list[dict[str, Any]]:
    """One table row per (label, encoder, training record or None, pretraining description)."""
    from bench import quality
    from bench.common import log

    rows = []
    for label, encoder, run, pretraining in entries:
        start = time.perf_counter()
        metrics = quality.score(encoder, splits, device, seed)
        rows.append({"label": label, "params": parameter_count(encoder), "pretraining": pretraining,
                     "train_s": run["train_s"] if run else None, "wall_s": run["wall_s"] if run else None,
                     "eval_s": time.perf_counter() - start, "metrics": metrics, **({"run": run} if run else {})})
        log(f"distill benchmark: {label}: kNN {100 * metrics['knn_top1']:.2f} / {100 * metrics['knn20_top1']:.2f}"
            f", probe {100 * metrics.get('linear_probe_top1', float('nan')):.2f}")
    return rows


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.teacher:
        args.teacher = str(Path(args.teacher).resolve())  # before chdir: relative to where it was typed
    args.workdir = str(Path(args.workdir).resolve())
    out = Path(args.out).resolve()
    sys.path.insert(0, str(REPO_ROOT))
    os.chdir(REPO_ROOT)  # data and config paths are relative to the repo root
    from bench import quality
    from bench.common import append_jsonl, environment, log
    from reprlab import distributed
    from reprlab.checkpoint import load_encoder, read_meta
    from reprlab.config import EncoderConfig
    from reprlab.stages.evaluate import resolve_encoders

    device = distributed.setup(args.device)
    splits = quality.evaluation_data(argparse.Namespace(data=args.data, eval_limit=args.eval_limit,
                                                        test_limit=args.test_limit, seeds=[args.seed]))
    teacher_dir, teacher = teacher_run(args)
    distilled = train(DISTILL_CONFIG, "distill_student", args.student, args.student_epochs, args,
                      extra=[f"method.params.teacher={teacher_dir}"])
    simclr, calibration = simclr_at_budget(args.student, distilled["train_s"], distilled["steps_per_epoch"], args)
    random_student = resolve_encoders([simclr["run_dir"], "random"], EncoderConfig(name=args.student),
                                      args.seed)[1].encoder
    teacher_meta = read_meta(teacher_dir)
    rows = score_rows([
        (f"teacher {teacher_meta['encoder']['name']}", load_encoder(teacher_dir), teacher,
         describe(teacher, teacher_meta)),
        (f"student {args.student}, distilled", load_encoder(distilled["run_dir"]), distilled, describe(distilled)),
        (f"student {args.student}, SimCLR", load_encoder(simclr["run_dir"]), simclr, describe(simclr)),
        (f"student {args.student}, random init", random_student, None, "none"),
    ], splits, device, args.seed)
    table = markdown(rows)
    print(f"\n{args.data} test top-1 (%); the SimCLR student's training time matched to the distilled "
          f"student's ({distilled['train_s'] / 60:.1f} min; SimCLR {simclr['train_s'] / 60:.1f} min)\n")
    print(table)
    record = {"benchmark": "distill", "data": args.data, "teacher": teacher_dir, "student": args.student,
              "student_epochs": args.student_epochs, "simclr_epochs": simclr["epochs"], "calibration": calibration,
              "limit": args.limit, "eval_limit": args.eval_limit, "test_limit": args.test_limit,
              "eval_sizes": {name: len(split) for name, split in splits.items()}, "seed": args.seed,
              "precision": args.precision, "device": str(device), "rows": rows, "table": table,
              "environment": environment()}
    log(f"appended to {append_jsonl(out, record)}")
    return 0
