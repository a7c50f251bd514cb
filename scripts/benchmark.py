"""Benchmarks: `python scripts/benchmark.py <benchmark> [options]`; each prints tables and appends one JSON line.

`python scripts/benchmark.py <benchmark> --help` gives what it measures, example commands and its options. Each
benchmark is one module in scripts/bench/ with `add_arguments(parser)` and `main(args) -> exit status`; the
lightly side of every comparison is scripts/bench/peers.py.
"""

import argparse
import sys
from types import ModuleType

from bench import augment_speed, conv_layers, data, distill, extract_speed, finetune, knn, pretrain_speed, quality

BENCHMARKS: dict[str, ModuleType] = {
    "quality": quality,  # pretraining methods on CIFAR-10 vs lightly's SimCLR: kNN / linear probe
    "pretrain": pretrain_speed,  # SimCLR pretraining speed vs lightly (+ --ablate, --scaling, --quality-check)
    "augment": augment_speed,  # batched views on the device vs per-sample pipelines
    "extract": extract_speed,  # feature extraction images/s
    "convs": conv_layers,  # per-convolution fp32 vs bf16 time at an encoder's shapes
    "knn": knn,  # faiss vs scikit-learn vs torch vs lightly
    "finetune": finetune,  # fine-tuning policies at 1% / 10% of the labels
    "data": data,  # image-file loading: reprlab's stream vs ImageFolder + PIL, decode floor, peak RSS by files
    "distill": distill,  # a teacher distilled into a small student vs SimCLR on it at equal wall time
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python scripts/benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="benchmark", required=True, metavar="<benchmark>",
                                     title="benchmarks")
    for name, module in BENCHMARKS.items():
        summary = module.__doc__.splitlines()[0]
        sub = commands.add_parser(name, help=summary.replace("%", "%%"), description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    sys.exit(BENCHMARKS[args.benchmark].main(args))
