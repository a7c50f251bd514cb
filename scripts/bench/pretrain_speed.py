"""SimCLR pretraining speed vs lightly: augment, model step, e2e.

    python scripts/benchmark.py pretrain                 # model step, augmentation, end to end vs lightly
    python scripts/benchmark.py pretrain --compile       # also end to end under torch.compile
    python scripts/benchmark.py pretrain --ablate        # what each fast-path piece buys (model step)
    python scripts/benchmark.py pretrain --scaling       # throughput vs batch size and image size + PNG
    python scripts/benchmark.py pretrain --quality-check # kNN top-1 after a short run: fp32 vs bf16

Parts, for each side: ``augment`` (uint8 batch -> two views: reprlab's pipeline on the device, lightly's
per-sample transforms in DataLoader workers), ``model`` (one optimizer step on the same ready views:
reprlab's ``method.forward_views``, lightly's two forward passes) and ``e2e`` (reprlab's engine.fit, lightly's
DataLoader feeding its step). The setting both sides share is in bench/speed_setup.py. Prints tables and
appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

from bench import ablation, peers, precision_check, scaling
from bench.common import environment, log, print_table, sgemm_gflops, summarize, throughput
from bench.speed_setup import (
    CONFIGS,
    add_common_arguments,
    build_lightly,
    build_reprlab,
    endless,
    lightly_dataset,
    lightly_e2e,
    load_images,
    make_views,
    model_flops,
    model_step,
    reprlab_e2e,
    run_and_record,
    timing,
    training_gflops,
)
from reprlab.data.datasets import ImageSet
from reprlab.data.loader import Batches
from reprlab.data.views import ViewAugment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="reprlab configurations (train.precision + train.channels_last)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each --configs entry with torch.compile, end to end")
    parser.add_argument("--ablate", action="store_true", help="model step with each fast-path piece")
    scaling.add_arguments(parser.add_argument_group("throughput vs batch and image size"))
    precision_check.add_arguments(parser.add_argument_group("fp32 vs bf16 quality check"))


def main(args: argparse.Namespace) -> int:
    run = scaling.run if args.scaling else precision_check.run if args.quality_check else run_pretrain
    return run_and_record(args, run)


def measure_sgemm(args: argparse.Namespace) -> dict[str, float]:
    """GFLOP/s of fp32 matmuls and, when a --configs entry runs in bf16, of bf16 ones (minutes on CPUs without
    bf16 instructions: skipped when nothing needs it)."""
    device = torch.device(args.device)
    precisions = ["fp32", *({CONFIGS[c][0] for c in args.configs} - {"fp32"})]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {p: sgemm_gflops(dtype=dtypes[p], device=device) for p in precisions}


def sgemm_text(sgemm: dict[str, float]) -> str:
    return ", ".join(f"{precision} {rate:.1f} GFLOP/s" for precision, rate in sgemm.items())


class PretrainTable:
    """Rows of pairs/s per (framework, config, part), with achieved GFLOP/s against the sgemm rate."""

    def __init__(self, forward_flops: float, sgemm: dict[str, float]) -> None:
        self.forward_flops, self.sgemm, self.rows = forward_flops, sgemm, []

    def add(self, framework: str, config: str, part: str, stats: dict, memory: dict | None = None,
            gemm: str | None = None) -> None:
        row = {"framework": framework, "config": config, "part": part, "pairs_per_s": stats["median"],
               "runs": stats["runs"]}
        if gemm is not None:
            row["gflops"] = training_gflops(stats["median"], self.forward_flops)
            row["sgemm_fraction"] = row["gflops"] / self.sgemm[gemm]
        if memory is not None:
            row["peak_mb"], row["delta_mb"] = memory["peak_mb"], memory["delta_mb"]
        self.rows.append(row)
        log(f"{framework} {config} {part}: {stats['median']:.1f} pairs/s")

    def best(self, framework: str, part: str, config: str | None = None) -> float | None:
        rates = [r["pairs_per_s"] for r in self.rows if r["framework"] == framework and r["part"] == part
                 and (config is None or r["config"] == config)]
        return max(rates) if rates else None

    def ratios(self) -> dict[str, float]:
        """reprlab / lightly per part; lightly's best setting (usually 2 workers) is the reference."""
        ratios = {}
        for part in ("augment", "model", "e2e"):
            reference = self.best("lightly", part)
            for config in ["any", *CONFIGS, *(f"{c}+compile" for c in CONFIGS)]:  # any: the augmentation
                ours = self.best("reprlab", part, config)
                if ours is not None and reference:
                    ratios[f"{part} {config}"] = ours / reference
        return ratios


def time_lightly(args: argparse.Namespace, data: ImageSet, augment: ViewAugment, views: list[Tensor],
                 table: PretrainTable) -> None:
    """lightly's rows: its DataLoader alone, its step on the ready views, and both together."""
    device, batch = torch.device(args.device), args.batch_size
    dataset = lightly_dataset(data, augment, args.image_size)
    for workers in args.workers:
        rates = [peers.loader_rate(dataset, batch, workers, args.warmup, args.steps) for _ in range(args.repeats)]
        table.add("lightly", f"workers={workers}", "augment", summarize(rates))
    model, criterion, optimizer = build_lightly(args)
    step = peers.lightly_step(model, criterion, optimizer, device)
    table.add("lightly", "fp32", "model", throughput(lambda: step(*views), batch, device=device, **timing(args)),
              gemm="fp32")
    for workers in args.workers:
        stats, memory = lightly_e2e(args, dataset, batch, workers, args.steps, args.warmup, args.repeats)
        table.add("lightly", f"workers={workers}", "e2e", stats, memory, gemm="fp32")


def time_reprlab(args: argparse.Namespace, data: ImageSet, augment: ViewAugment, views: list[Tensor],
                 table: PretrainTable) -> None:
    """reprlab's rows: the pipeline alone (uint8 batch on the device -> two views), the model step on the
    ready views per configuration, engine.fit end to end (and compiled, with --compile)."""
    device, batch = torch.device(args.device), args.batch_size
    stream = endless(Batches(data, batch, seed=args.seed))
    table.add("reprlab", "any", "augment", throughput(lambda: augment.views(next(stream)["images"].to(device)),
                                                      batch, device=device, **timing(args)))
    for config in args.configs:
        precision, channels_last = CONFIGS[config]
        method, optimizer, scheduler = build_reprlab(args, channels_last)
        step = model_step(method, optimizer, scheduler, views, precision, device)
        table.add("reprlab", config, "model", throughput(step, batch, device=device, **timing(args)),
                  gemm=precision)
        stats, memory = reprlab_e2e(args, data, config, batch, args.steps, args.warmup, args.repeats)
        table.add("reprlab", config, "e2e", stats, memory, gemm=precision)
    for config in args.configs if args.compile else ():
        log(f"compiling {config} (minutes on a small CPU) ...")
        stats, memory = reprlab_e2e(args, data, config, batch, args.steps, args.warmup + 2, args.repeats,
                                    compile_model=True)
        table.add("reprlab", f"{config}+compile", "e2e", stats, memory, gemm=CONFIGS[config][0])


def run_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    device, size, batch = torch.device(args.device), args.image_size, args.batch_size
    data = load_images(args.data, args.limit, args.seed, size)
    log(f"data: {len(data)} images {tuple(data.images.shape[1:])}")
    sgemm = measure_sgemm(args)
    flops = model_flops(args, size)
    log(f"sgemm {sgemm_text(sgemm)}; forward {flops / 1e6:.1f} MFLOP/image")
    augment = build_reprlab(args)[0].augment  # reprlab's default SimCLR pipeline: the strengths of both sides
    views = make_views(augment, data, batch, device, args.seed)  # [(B, C, S, S)] * 2: both model steps'
    table = PretrainTable(flops, sgemm)
    # lightly first, so process-wide state left by reprlab's runs (allocator heap, kernels) cannot help it
    if args.lightly and peers.lightly_available():
        time_lightly(args, data, augment, views, table)
    elif args.lightly:
        log(peers.LIGHTLY_MISSING)
    time_reprlab(args, data, augment, views, table)

    ratios = table.ratios()
    ablated = ablation.run(args, data, augment, views) if args.ablate else None
    rows = sorted(table.rows, key=lambda row: row["framework"] != "reprlab")  # stable: reprlab rows first
    print_table(rows, ["framework", "config", "part", "pairs_per_s", "gflops", "sgemm_fraction", "peak_mb",
                       "delta_mb"],
                title=f"SimCLR pretraining, batch {batch}, {size} px, {args.encoder} (pairs/s = source images/s)")
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"],
                title="reprlab / lightly (best lightly setting)")
    print(f"sgemm: {sgemm_text(sgemm)}; forward {flops / 1e6:.1f} MFLOP per image (x3 per training step)")
    return {"bench": "pretrain", "env": environment(), "args": vars(args), "sgemm_gflops": sgemm,
            "forward_mflops_per_image": flops / 1e6, "results": rows, "ratios": ratios, "ablation": ablated}
