"""SimCLR end-to-end throughput against batch size and image size, reprlab and lightly, plus a PNG.

    python scripts/benchmark.py pretrain --scaling
    python scripts/benchmark.py pretrain --scaling --scaling-batch-sizes 128 256 --scaling-image-sizes 32 64

Batch sizes at --image-size, image sizes at --batch-size (images resized once, as a dataset stored at that
resolution); reprlab's engine.fit for each --configs entry and lightly at the first --workers setting.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from bench import peers
from bench.common import REPO_ROOT, environment, log, print_table
from bench.speed_setup import (
    build_reprlab,
    lightly_dataset,
    lightly_e2e,
    load_images,
    reprlab_e2e,
    resize_images,
    sample,
)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--scaling", action="store_true", help="throughput vs batch size and image size")
    group.add_argument("--scaling-batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    group.add_argument("--scaling-image-sizes", type=int, nargs="+", default=[32, 64, 96])
    group.add_argument("--scaling-steps", type=int, default=5)
    group.add_argument("--scaling-repeats", type=int, default=1)
    group.add_argument("--plot", default=str(REPO_ROOT / "benchmarks" / "pretrain_scaling.png"))


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = load_images(args.data, args.limit, args.seed)
    with_lightly = args.lightly and peers.lightly_available()
    if args.lightly and not with_lightly:
        log(peers.LIGHTLY_MISSING)
    augment = build_reprlab(args)[0].augment  # lightly's transform gets its strengths
    points = [("batch_size", b, args.image_size) for b in args.scaling_batch_sizes]
    points += [("image_size", args.batch_size, s) for s in args.scaling_image_sizes]
    rows = []
    steps, warmup, repeats = args.scaling_steps, 1, args.scaling_repeats
    for axis, batch, size in points:
        data = resize_images(sample(base, (warmup + steps) * batch, args.seed), size)
        point = {"axis": axis, "batch_size": batch, "image_size": size}
        for config in args.configs:
            stats, memory = reprlab_e2e(args, data, config, batch, steps, warmup, repeats)
            rows.append({**point, "series": f"reprlab {config}", "pairs_per_s": stats["median"],
                         "peak_mb": memory["peak_mb"]})
            log(f"scaling {axis} B={batch} S={size} reprlab {config}: {stats['median']:.1f} pairs/s")
        if with_lightly:
            workers = args.workers[0]
            dataset = lightly_dataset(data, augment, size)
            stats, memory = lightly_e2e(args, dataset, batch, workers, steps, warmup, repeats)
            rows.append({**point, "series": f"lightly workers={workers}", "pairs_per_s": stats["median"],
                         "peak_mb": memory["peak_mb"]})
            log(f"scaling {axis} B={batch} S={size} lightly: {stats['median']:.1f} pairs/s")
    print_table(rows, ["axis", "batch_size", "image_size", "series", "pairs_per_s", "peak_mb"],
                title="SimCLR end-to-end scaling (pairs/s)")
    plot = plot_scaling(rows, Path(args.plot))
    print(f"plot: {plot}")
    return {"bench": "pretrain_scaling", "env": environment(), "args": vars(args), "results": rows,
            "plot": str(plot)}


def plot_scaling(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (axis, label) in zip(axes, (("batch_size", "batch size"), ("image_size", "image size (px)"))):
        for series in dict.fromkeys(r["series"] for r in rows):
            points = sorted((r[axis], r["pairs_per_s"]) for r in rows
                            if r["axis"] == axis and r["series"] == series)
            if points:
                ax.plot(*zip(*points), marker="o", label=series)
        ax.set_xlabel(label)
        ax.set_ylabel("image pairs / s (end to end)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r[axis] for r in rows if r["axis"] == axis})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"SimCLR throughput, {torch.get_num_threads()} torch thread(s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
