"""Pretraining speed vs lightly (SimCLR, BYOL, DINO): augment, model step, e2e.

    python scripts/benchmark.py pretrain                 # model step, augmentation, end to end vs lightly
    python scripts/benchmark.py pretrain --method simclr byol dino   # the same for BYOL and DINO too
    python scripts/benchmark.py pretrain --compile       # also end to end under torch.compile
    python scripts/benchmark.py pretrain --ablate        # what each fast-path piece buys (model step)
    python scripts/benchmark.py pretrain --scaling       # throughput vs batch size and image size + PNG
    python scripts/benchmark.py pretrain --quality-check # kNN top-1 after a short run: fp32 vs bf16

Parts, for each side: ``augment`` (uint8 batch -> two views: reprlab's pipeline on the device, lightly's
per-sample transforms in DataLoader workers), ``model`` (one optimizer step on the same ready views:
reprlab's ``method.forward_views``, lightly's two forward passes) and ``e2e`` (reprlab's engine.fit, lightly's
DataLoader feeding its step). The setting both sides share is in bench/speed_setup.py. ``--method``: SimCLR
(default), BYOL and DINO at their CIFAR-10 configs (DINO: two 32 px global and two 16 px local crops) beside
lightly's twin of each (bench.peer_methods), each timed the same way; achieved GFLOP/s are computed for SimCLR
only. Ratios are reprlab / lightly per part; SimCLR's keys are ``"<part> <config>"``, the other methods'
``"<method> <part> <config>"``. --ablate, --scaling and --quality-check time SimCLR. Prints tables and appends
one JSON line to --out.
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
    METHODS,
    add_common_arguments,
    build_lightly_twin,
    build_reprlab,
    endless,
    lightly_dataset,
    lightly_e2e,
    lightly_model_step,
    load_images,
    make_views,
    method_views,
    model_flops,
    model_step,
    reprlab_e2e,
    resolved,
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
    parser.add_argument("--method", nargs="+", default=["simclr"], choices=list(METHODS),
                        help="methods to time (BYOL and DINO at their CIFAR-10 configs)")
    parser.add_argument("--ablate", action="store_true", help="model step with each fast-path piece (SimCLR)")
    scaling.add_arguments(parser.add_argument_group("throughput vs batch and image size"))
    precision_check.add_arguments(parser.add_argument_group("fp32 vs bf16 quality check"))


def main(args: argparse.Namespace) -> int:
    run = scaling.run if args.scaling else precision_check.run if args.quality_check else run_pretrain
    return run_and_record(args, run)


def measure_sgemm(args: argparse.Namespace, numerics: dict[str, dict]) -> dict[str, float]:
    """GFLOP/s of fp32 matmuls and, when a --configs entry runs in bf16, of bf16 ones (minutes on CPUs without
    bf16 instructions: skipped when nothing needs it)."""
    device = torch.device(args.device)
    precisions = ["fp32", *({n["precision"] for n in numerics.values()} - {"fp32"})]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {p: sgemm_gflops(dtype=dtypes[p], device=device) for p in precisions}


def sgemm_text(sgemm: dict[str, float]) -> str:
    return ", ".join(f"{precision} {rate:.1f} GFLOP/s" for precision, rate in sgemm.items())


class PretrainTable:
    """Rows of pairs/s per (framework, config, part), with achieved GFLOP/s against the sgemm rate."""

    def __init__(self, forward_flops: float, sgemm: dict[str, float]) -> None:
        self.forward_flops, self.sgemm, self.rows = forward_flops, sgemm, []

    method = "simclr"  # the method the next rows time (set per method by run_pretrain)

    def add(self, framework: str, config: str, part: str, stats: dict, memory: dict | None = None,
            gemm: str | None = None) -> None:
        row = {"method": self.method, "framework": framework, "config": config, "part": part,
               "pairs_per_s": stats["median"], "runs": stats["runs"]}
        if gemm is not None and self.method == "simclr":  # FLOPs counted for SimCLR's encoder + projector
            row["gflops"] = training_gflops(stats["median"], self.forward_flops)
            row["sgemm_fraction"] = row["gflops"] / self.sgemm[gemm]
        if memory is not None:
            row["peak_mb"], row["delta_mb"] = memory["peak_mb"], memory["delta_mb"]
        self.rows.append(row)
        log(f"{self.method} {framework} {config} {part}: {stats['median']:.1f} pairs/s")

    def best(self, method: str, framework: str, part: str, config: str | None = None) -> float | None:
        rates = [r["pairs_per_s"] for r in self.rows if r["method"] == method and r["framework"] == framework
                 and r["part"] == part and (config is None or r["config"] == config)]
        return max(rates) if rates else None

    def ratios(self) -> dict[str, float]:
        """reprlab / lightly per method and part; lightly's best setting (usually 2 workers) is the reference."""
        ratios = {}
        for method in dict.fromkeys(r["method"] for r in self.rows):
            prefix = "" if method == "simclr" else f"{method} "  # SimCLR keeps the keys of earlier records
            for part in ("augment", "model", "e2e"):
                reference = self.best(method, "lightly", part)
                for config in ["any", *CONFIGS, *(f"{c}+compile" for c in CONFIGS)]:  # any: the augmentation
                    ours = self.best(method, "reprlab", part, config)
                    if ours is not None and reference:
                        ratios[f"{prefix}{part} {config}"] = ours / reference
        return ratios


def time_lightly(args: argparse.Namespace, data: ImageSet, augment: ViewAugment, views: list[Tensor],
                 table: PretrainTable) -> None:
    """lightly's rows for ``table.method``: its DataLoader alone, its step on the ready views, and both
    together."""
    device, batch, method = torch.device(args.device), args.batch_size, table.method
    transform = None if method == "simclr" else build_lightly_twin(args, method).transform
    dataset = lightly_dataset(data, augment, args.image_size, transform)
    for workers in args.workers:
        rates = [peers.loader_rate(dataset, batch, workers, args.warmup, args.steps) for _ in range(args.repeats)]
        table.add("lightly", f"workers={workers}", "augment", summarize(rates))
    step = lightly_model_step(args, method)
    table.add("lightly", "fp32", "model", throughput(lambda: step(*views), batch, device=device, **timing(args)),
              gemm="fp32")
    for workers in args.workers:
        stats, memory = lightly_e2e(args, dataset, batch, workers, args.steps, args.warmup, args.repeats, method)
        table.add("lightly", f"workers={workers}", "e2e", stats, memory, gemm="fp32")


def time_reprlab(args: argparse.Namespace, data: ImageSet, augment: Any, views: list[Tensor],
                 table: PretrainTable, numerics: dict[str, dict]) -> None:
    """reprlab's rows for ``table.method``: the pipeline alone (``augment.views``: uint8 batch on the device ->
    the views; SimCLR's ViewAugment, another method itself), the
    model step on the ready views per configuration, engine.fit end to end (and compiled, with --compile)."""
    device, batch, method = torch.device(args.device), args.batch_size, table.method
    stream = endless(Batches(data, batch, seed=args.seed))
    table.add("reprlab", "any", "augment", throughput(lambda: augment.views(next(stream)["images"].to(device)),
                                                      batch, device=device, **timing(args)))
    for config in args.configs:
        precision, channels_last = numerics[config]["precision"], numerics[config]["channels_last"]
        task, optimizer, scheduler = build_reprlab(args, channels_last, method_name=method)
        step = model_step(task, optimizer, scheduler, views, precision, device)
        table.add("reprlab", config, "model", throughput(step, batch, device=device, **timing(args)),
                  gemm=precision)
        stats, memory = reprlab_e2e(args, data, config, batch, args.steps, args.warmup, args.repeats,
                                    method_name=method)
        table.add("reprlab", config, "e2e", stats, memory, gemm=precision)
    for config in args.configs if args.compile else ():
        log(f"compiling {config} (minutes on a small CPU) ...")
        stats, memory = reprlab_e2e(args, data, config, batch, args.steps, args.warmup + 2, args.repeats,
                                    compile_model=True, method_name=method)
        table.add("reprlab", f"{config}+compile", "e2e", stats, memory, gemm=numerics[config]["precision"])


def run_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    device, size, batch = torch.device(args.device), args.image_size, args.batch_size
    if args.ablate and "simclr" not in args.method:
        raise ValueError("--ablate times SimCLR's model step: add simclr to --method")
    data = load_images(args.data, args.limit, args.seed, size)
    log(f"data: {len(data)} images {tuple(data.images.shape[1:])}")
    model = build_reprlab(args)[0]  # the same encoder for every method: one resolution of each configuration
    numerics = {config: dict(zip(("precision", "channels_last"), resolved(config, device, model)))
                for config in args.configs}
    log(f"configurations run as: {numerics}")
    sgemm = measure_sgemm(args, numerics)
    flops = model_flops(args, size)
    log(f"sgemm {sgemm_text(sgemm)}; forward {flops / 1e6:.1f} MFLOP/image")
    table = PretrainTable(flops, sgemm)
    for method in args.method:
        table.method = method
        task = build_reprlab(args, method_name=method)[0]
        if method == "simclr":  # reprlab's default SimCLR pipeline: the strengths of both sides
            augment, views = task.augment, make_views(task.augment, data, batch, device, args.seed)
            simclr_augment, simclr_views = augment, views
        else:  # the method's own views (DINO: 2 global + local crops); lightly's twin takes their settings
            augment, views = task, method_views(task, data, batch, device, args.seed)
        # lightly first, so process-wide state left by reprlab's runs (allocator heap, kernels) cannot help it
        if args.lightly and peers.lightly_available():
            time_lightly(args, data, augment, views, table)
        elif args.lightly:
            log(peers.LIGHTLY_MISSING)
        time_reprlab(args, data, augment, views, table, numerics)
    ratios = table.ratios()
    ablated = ablation.run(args, data, simclr_augment, simclr_views) if args.ablate else None
    order = {method: i for i, method in enumerate(args.method)}  # stable: per method, reprlab rows first
    rows = sorted(table.rows, key=lambda row: (order[row["method"]], row["framework"] != "reprlab"))
    print_table(rows, ["method", "framework", "config", "part", "pairs_per_s", "gflops", "sgemm_fraction",
                       "peak_mb", "delta_mb"],
                title=f"{', '.join(args.method)} pretraining, batch {batch}, {size} px, {args.encoder} "
                      "(pairs/s = source images/s)")
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"],
                title="reprlab / lightly (best lightly setting)")
    print(f"sgemm: {sgemm_text(sgemm)}; SimCLR forward {flops / 1e6:.1f} MFLOP per image (x3 per training step)")
    return {"bench": "pretrain", "env": environment(), "args": vars(args), "numerics": numerics,
            "sgemm_gflops": sgemm,
            "forward_mflops_per_image": flops / 1e6, "results": rows, "ratios": ratios, "ablation": ablated}
