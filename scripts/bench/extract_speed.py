"""Feature extraction images/s: fp32 / bf16, channels_last or not.

    python scripts/benchmark.py extract                          # 10,000 images, batch 512, resnet18
    python scripts/benchmark.py extract --extract-images 2000 --repeats 1

reprlab.evaluate.features.extract_features over uint8 images (the evaluation stage's path), after one
warm-up pass; achieved GFLOP/s against the sgemm rate of the same precision measured in the same run. Prints a
table and appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import environment, forward_flops, log, print_table, sgemm_gflops, summarize
from bench.speed_setup import add_common_arguments, encoder_kwargs, load_images, run_and_record
from reprlab.models.encoders import create_encoder

# (name, precision, encoder channels_last); under bf16 extract_features feeds a convnet channels_last batches
# either way, so the two bf16 rows differ only in the weights' layout
VARIANTS = (("fp32", "fp32", False), ("fp32 + channels_last", "fp32", True), ("bf16, encoder as loaded", "bf16", False),
            ("bf16, encoder channels_last", "bf16", True))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--extract-images", type=int, default=10_000)
    parser.add_argument("--extract-batch-size", type=int, default=512)


def main(args: argparse.Namespace) -> int:
    return run_and_record(args, run)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from reprlab.evaluate.features import extract_features

    device, size = torch.device(args.device), args.image_size
    images = load_images(args.data, args.extract_images, args.seed, size).images
    sgemm = {"fp32": sgemm_gflops(device=device), "bf16": sgemm_gflops(dtype=torch.bfloat16, device=device)}
    torch.manual_seed(args.seed)
    encoder = create_encoder(args.encoder, **encoder_kwargs(args))
    flops = forward_flops(encoder, torch.rand(4, 3, size, size))
    rows = []
    for name, precision, channels_last in VARIANTS:
        encoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

        def block(precision: str = precision) -> float:
            start = time.perf_counter()
            extract_features(encoder, images, batch_size=args.extract_batch_size, device=device,
                             precision=precision)
            return len(images) / (time.perf_counter() - start)

        block()  # warm-up: allocator, kernel choice
        stats = summarize([block() for _ in range(args.repeats)])
        gflops = stats["median"] * flops / 1e9
        rows.append({"config": name, "images_per_s": stats["median"], "runs": stats["runs"], "gflops": gflops,
                     "sgemm_fraction": gflops / sgemm[precision]})
        log(f"extract {name}: {stats['median']:.0f} images/s")
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
    print_table(rows, ["config", "images_per_s", "speedup", "gflops", "sgemm_fraction"],
                title=f"extract_features, {len(images)} images, {size} px, batch {args.extract_batch_size}, "
                      f"{args.encoder}")
    print(f"sgemm: fp32 {sgemm['fp32']:.1f} GFLOP/s, bf16 {sgemm['bf16']:.1f}; "
          f"forward {flops / 1e6:.1f} MFLOP/image")
    return {"bench": "extract", "env": environment(), "args": vars(args), "sgemm_gflops": sgemm,
            "forward_mflops_per_image": flops / 1e6, "results": rows}
