"""What each fast-path piece buys the SimCLR model step: precision, channels_last, the optimizer kernel.

    python scripts/benchmark.py pretrain --ablate

Model-step pairs/s (``method.forward_views`` on ready views, then the optimizer step) for each piece alone and
together, then the augmentation alone under the settings engine.fit runs it in. The optimizer variants replace
build_optimization's SGD by torch's foreach / fused SGD (same maths). A table inside the pretrain record.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import Tensor

from bench.common import log, print_table, throughput
from bench.speed_setup import SGD, autocast, build_reprlab, model_flops, model_step, sample, timing, training_gflops
from reprlab.data.datasets import ImageSet
from reprlab.data.views import ViewAugment

MODEL_VARIANTS = (  # (name, precision, model channels_last, views channels_last, optimizer)
    ("fp32", "fp32", False, False, None),
    ("fp32 + channels_last model", "fp32", True, False, None),
    ("fp32 + channels_last model and views", "fp32", True, True, None),
    ("bf16", "bf16", False, False, None),
    ("bf16 + channels_last model", "bf16", True, False, None),
    ("bf16 + channels_last model and views", "bf16", True, True, None),
    ("bf16 + channels_last + foreach SGD", "bf16", True, True, "foreach"),
    ("bf16 + channels_last + fused SGD", "bf16", True, True, "fused"),
)
AUGMENT_VARIANTS = (  # (name, precision, channels_last copy): fp32 is how the model-step-alone rows get views
    ("augment fp32", "fp32", False),
    ("augment under bf16 autocast", "bf16", False),
    ("augment fp32 + channels_last copy", "fp32", True),
)


def torch_sgd(optimizer: torch.optim.Optimizer, kind: str) -> tuple[torch.optim.Optimizer, Any]:
    """``optimizer``'s parameter groups under torch's SGD with ``foreach`` or ``fused`` kernels, constant lr."""
    groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]}
              for g in optimizer.param_groups]
    sgd = torch.optim.SGD(groups, lr=SGD["lr"], momentum=SGD["momentum"], **{kind: True})
    return sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda step: 1.0)


def model_rows(args: argparse.Namespace, views: list[Tensor]) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    views_cl = [v.contiguous(memory_format=torch.channels_last) for v in views]
    flops = model_flops(args, args.image_size)
    rows = []
    for name, precision, model_cl, views_are_cl, optimizer_kind in MODEL_VARIANTS:
        method, optimizer, scheduler = build_reprlab(args, model_cl)
        if optimizer_kind is not None:
            optimizer, scheduler = torch_sgd(optimizer, optimizer_kind)
        step = model_step(method, optimizer, scheduler, views_cl if views_are_cl else views, precision, device)
        try:
            stats = throughput(step, args.batch_size, device=device, **timing(args))
        except RuntimeError as error:  # e.g. fused SGD without a kernel for this device
            log(f"ablation {name}: {error}")
            continue
        rows.append({"variant": name, "pairs_per_s": stats["median"], "runs": stats["runs"],
                     "gflops": training_gflops(stats["median"], flops)})
        log(f"ablation {name}: {stats['median']:.1f} pairs/s")
    for row in rows:
        row["speedup"] = row["pairs_per_s"] / rows[0]["pairs_per_s"]
    return rows


def augment_rows(args: argparse.Namespace, data: ImageSet, augment: ViewAugment) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    images = sample(data, args.batch_size, args.seed).images.to(device)
    rows = []
    for name, precision, to_channels_last in AUGMENT_VARIANTS:
        def make(precision: str = precision, to_channels_last: bool = to_channels_last) -> None:
            with autocast(device, precision):
                views = augment.views(images, n=2)
            if to_channels_last:
                [v.contiguous(memory_format=torch.channels_last) for v in views]

        stats = throughput(make, args.batch_size, device=device, **timing(args))
        rows.append({"variant": name, "pairs_per_s": stats["median"], "runs": stats["runs"]})
    return rows


def run(args: argparse.Namespace, data: ImageSet, augment: ViewAugment, views: list[Tensor]) -> list[dict[str, Any]]:
    """The model-step rows, then the augmentation rows (``augment``: the pipeline that made ``views``)."""
    rows = model_rows(args, views) + augment_rows(args, data, augment)
    print_table(rows, ["variant", "pairs_per_s", "speedup", "gflops"],
                title=f"ablation: model step alone, batch {args.batch_size}, {args.image_size} px")
    return rows
