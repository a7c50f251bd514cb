"""Benchmarks: `python scripts/benchmark.py <name> [options]`, each printing a table and writing one JSON line.

Names: quality (pretraining methods on CIFAR-10 vs lightly), pretrain / augment / extract (speed vs lightly),
knn (faiss vs scikit-learn vs torch), finetune (policies at 1% / 10% labels). Each module lives in scripts/bench/.
"""

import importlib
import sys

BENCHMARKS = {
    "quality": "bench.quality",
    "pretrain": "bench.speed",
    "augment": "bench.speed",
    "extract": "bench.speed",
    "knn": "bench.knn",
    "finetune": "bench.finetune",
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python scripts/benchmark.py {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(BENCHMARKS[sys.argv[1]])
    sys.exit(module.main(sys.argv[1:]))
