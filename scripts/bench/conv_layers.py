"""Per-convolution forward + backward time, fp32 against bf16, at the shapes one encoder meets.

    python scripts/benchmark.py convs                     # ResNet-18, batch 512 (two SimCLR views), 32 px
    python scripts/benchmark.py convs --image-size 16     # DINO's local crops

Each Conv2d of the encoder is timed alone on the input shape it sees in one forward pass: fp32 on NCHW, and bf16
autocast on channels_last (what ``precision: auto`` runs), without reprlab's CPU bf16 guard, so the table shows
which calls the guard's small-map rule (reprlab/cpu_bf16_convs.py) moves to fp32 and what that is worth. Also
each call's share of the encoder's convolution FLOPs. Prints a table and appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from bench.common import environment, log, print_table, summarize
from bench.speed_setup import add_common_arguments, encoder_kwargs, run_and_record
from reprlab.cpu_bf16_convs import output_shape, small_map
from reprlab.hardware import cpu_flags
from reprlab.models.encoders import create_encoder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--conv-batch", type=int, default=512, help="images per call (SimCLR: 2 x batch)")


def main(args: argparse.Namespace) -> int:
    return run_and_record(args, run)


def conv_calls(encoder: nn.Module, batch: Tensor) -> list[tuple[str, nn.Conv2d, tuple[int, ...]]]:
    """(name, conv, input shape) of every Conv2d call in one forward pass of ``encoder`` on ``batch``."""
    calls, handles = [], []
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: calls.append((name, m, tuple(a[0].shape)))))
    with torch.no_grad():
        encoder(batch)
    for handle in handles:
        handle.remove()
    return calls


def time_call(conv: nn.Conv2d, shape: tuple[int, ...], bf16: bool, repeats: int) -> float:
    """Median ms of one forward + backward of ``conv`` on a random input of ``shape``."""
    layout = torch.channels_last if bf16 else torch.contiguous_format
    conv = conv.to(memory_format=layout)
    images = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()

    def once() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(images)
        out.float().sum().backward()
        return (time.perf_counter() - start) * 1e3

    once()  # warm-up: kernel choice
    return summarize([once() for _ in range(repeats)])["median"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    encoder = create_encoder(args.encoder, **encoder_kwargs(args)).backbone
    calls = conv_calls(encoder, torch.rand(2, 3, args.image_size, args.image_size))
    macs = {name: math.prod(output_shape(conv, shape[2:])) * conv.weight.numel() for name, conv, shape in calls}
    threshold, rows = small_map("amx_bf16" in cpu_flags()), []
    for name, conv, shape in calls:
        shape = (args.conv_batch, *shape[1:])
        fp32, bf16 = (time_call(conv, shape, bf16, args.repeats) for bf16 in (False, True))
        out = output_shape(conv, shape[2:])
        rows.append({"conv": name, "input": "x".join(map(str, shape[1:])), "output_px": math.prod(out),
                     "flops_share": macs[name] / sum(macs.values()), "fp32_ms": fp32, "bf16_ms": bf16,
                     "bf16_over_fp32": bf16 / fp32, "small_map": math.prod(out) <= threshold})
        log(f"{name}: fp32 {fp32:.1f} ms, bf16 {bf16:.1f} ms")
    small = [r for r in rows if r["small_map"]]
    summary = {"small_map_flops_share": sum(r["flops_share"] for r in small),
               "small_map_fp32_ms": sum(r["fp32_ms"] for r in small),
               "small_map_bf16_ms": sum(r["bf16_ms"] for r in small),
               "other_fp32_ms": sum(r["fp32_ms"] for r in rows if not r["small_map"]),
               "other_bf16_ms": sum(r["bf16_ms"] for r in rows if not r["small_map"])}
    print_table(rows, ["conv", "input", "output_px", "flops_share", "fp32_ms", "bf16_ms", "bf16_over_fp32"],
                title=f"{args.encoder} convolutions, forward + backward, batch {args.conv_batch}, "
                      f"{args.image_size} px (bf16: autocast + channels_last, no guard)")
    print(" ".join(f"{key} {value:.3g}" for key, value in summary.items()))
    return {"bench": "convs", "env": environment(), "args": vars(args), "rows": rows, "summary": summary}
